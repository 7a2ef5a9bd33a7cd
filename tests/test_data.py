"""Data-layer checks for quirks of the real EchoNet-Dynamic release that the phantom does not produce by itself."""
import shutil
import numpy as np
import pandas as pd
import pytest
import torch

from echobook.core import read_json
from echobook.data.echonet import (EchobookDataError, read_filelist, read_tracings, scan_dataset, inspect_dataset,
                                   tracing_to_keypoints, keypoints_to_mask, read_video, show_tracing, EF_POLICY, POLICIES,
                                   TRACING_POLICIES, tracings_state, require_tracings)
from echobook.data.clips import prepare_cache, read_cache_index, load_clip, EchoClips, LandmarkClips
from echobook.evaluation import keypoints_to_mask as eval_mask


@pytest.fixture
def copy(phantom_dir, tmp_path):
    "A writable copy of the session phantom."
    dst = tmp_path/'data'
    shutil.copytree(phantom_dir, dst)
    return dst


def _rewrite(path, fn):
    df = pd.read_csv(path); df = fn(df); df.to_csv(path, index=False)


def test_filelist_with_avi_names_and_crlf_tracings(copy):
    _rewrite(copy/'FileList.csv', lambda d: d.assign(FileName=d.FileName + '.avi'))
    text = (copy/'VolumeTracings.csv').read_text()
    (copy/'VolumeTracings.csv').write_bytes(text.replace('\n', '\r\n').encode())
    scan = scan_dataset(copy)
    assert len(scan.excluded) == 0 and len(scan.records) == 24
    assert not any(r.FileName.endswith('.avi') for r in scan.records)


def test_frames_without_21_lines_policies(copy):
    "A 20-line frame excludes the video under 'exclude-video'; 'drop-frames' keeps it if two good frames remain."
    tr = pd.read_csv(copy/'VolumeTracings.csv')
    name = tr.FileName.iloc[0]
    frames = tr[tr.FileName == name].Frame.unique()
    extra = tr[(tr.FileName == name) & (tr.Frame == frames[0])].iloc[:20].assign(Frame=frames.max() + 3)  # a third, incomplete tracing
    pd.concat([tr, extra]).to_csv(copy/'VolumeTracings.csv', index=False)
    strict = scan_dataset(copy, policy='exclude-video')
    assert list(strict.excluded.FileName) == [name[:-4]]
    assert '21 lines' in strict.excluded.reason.iloc[0]
    lenient = scan_dataset(copy, policy='drop-frames')
    assert len(lenient.excluded) == 0
    rec = next(r for r in lenient.records if r.FileName == name[:-4])
    assert {rec.ed_frame, rec.es_frame} == set(int(f) for f in frames)


def test_two_tracings_on_one_frame_is_reported(copy):
    tr = pd.read_csv(copy/'VolumeTracings.csv')
    name = tr.FileName.iloc[0]
    rows = tr.FileName == name
    tr.loc[rows, 'Frame'] = tr.loc[rows, 'Frame'].iloc[0]
    tr.to_csv(copy/'VolumeTracings.csv', index=False)
    ex = scan_dataset(copy, policy='drop-frames').excluded
    assert 'ED == ES' in ex.reason.iloc[0]


def test_untraced_video_excluded_with_reason(copy):
    _rewrite(copy/'VolumeTracings.csv', lambda d: d[d.FileName != d.FileName.iloc[0]])
    rep = inspect_dataset(copy)
    assert [e['reason'] for e in rep['excluded']] == ['no tracings']
    assert len(rep['records']) == 23


def test_non_numeric_tracing_names_file_and_line(copy):
    tr = pd.read_csv(copy/'VolumeTracings.csv').astype({'X1': object})
    tr.loc[5, 'X1'] = 'abc'
    tr.to_csv(copy/'VolumeTracings.csv', index=False)
    with pytest.raises(EchobookDataError, match=r'VolumeTracings.csv.*line 7'):
        read_tracings(copy)


def test_missing_filelist_column(copy):
    _rewrite(copy/'FileList.csv', lambda d: d.drop(columns=['Split']))
    with pytest.raises(EchobookDataError, match=r"FileList.csv: missing columns \['Split'\]"):
        read_filelist(copy)


def test_nan_ef_and_non_112_videos(copy):
    fl = pd.read_csv(copy/'FileList.csv')
    fl.loc[0, 'EF'] = np.nan
    fl.to_csv(copy/'FileList.csv', index=False)
    import cv2
    w = cv2.VideoWriter(str(copy/'Videos'/f'{fl.FileName[1]}.avi'), cv2.VideoWriter_fourcc(*'MJPG'), 50, (160, 120))
    for _ in range(100): w.write(np.zeros((120, 160, 3), np.uint8))
    w.release()
    scan = scan_dataset(copy)
    reasons = dict(zip(scan.excluded.FileName, scan.excluded.reason))
    assert 'tracings are in 112×112' in reasons[fl.FileName[1]]
    rec = next(r for r in scan.records if r.FileName == fl.FileName[0])
    assert np.isnan(rec.ef_filelist) and not np.isnan(rec.ef_tracings)


def test_ef_policy_keeps_every_test_video_with_an_ef(copy):
    "EF policy: irregular or missing tracings keep a TEST video (untraced, with the reason); a NaN EF or a lost video excludes it."
    fl, tr = pd.read_csv(copy/'FileList.csv'), pd.read_csv(copy/'VolumeTracings.csv')
    test = list(fl.FileName[fl.Split == 'TEST'])
    of = lambda n: tr.index[tr.FileName == n + '.avi']
    tr = pd.concat([tr, tr.loc[of(test[0])[:1]]]).drop(of(test[1]))        # 22 lines on one frame; no tracing at all
    tr.to_csv(copy/'VolumeTracings.csv', index=False)
    train = list(fl.FileName[fl.Split == 'TRAIN'])
    fl.loc[fl.FileName == train[0], 'EF'] = np.nan
    fl.to_csv(copy/'FileList.csv', index=False)
    (copy/'Videos'/f'{train[1]}.avi').unlink()
    landmark, ef = scan_dataset(copy), scan_dataset(copy, policy=EF_POLICY)
    assert len(landmark.split('TEST')) == len(test) - 2                     # the landmark policy is unchanged
    assert [r.FileName for r in ef.split('TEST')] == test                    # every TEST video, in FileList order
    untraced = {r.FileName: r for r in ef.records if not r.traced}
    assert set(untraced) == set(test[:2]) and untraced[test[1]].no_tracing == 'no tracings'
    assert '22' in untraced[test[0]].no_tracing and untraced[test[0]].ed_frame is None and np.isnan(untraced[test[0]].ef_tracings)
    assert np.isfinite(untraced[test[0]].ef_filelist)
    reasons = dict(zip(ef.excluded.FileName, ef.excluded.reason))
    assert reasons == {train[0]: 'FileList EF nan is not a finite percentage', train[1]: 'video file not found'}
    assert ef.counts().loc['TEST', ['listed', 'usable', 'traced']].tolist() == [len(test), len(test), len(test) - 2]
    assert POLICIES == (*TRACING_POLICIES, EF_POLICY)


@pytest.mark.parametrize('state', ['missing', 'empty', 'header only'])
def test_ef_only_folder(copy, state):
    "No VolumeTracings.csv, a 0-byte one or a header only: an EF-only folder, reported as such; tracing policies stop naming the file."
    path = copy/'VolumeTracings.csv'
    if state == 'missing': path.unlink()
    else: path.write_text('' if state == 'empty' else 'FileName,X1,Y1,X2,Y2,Frame\n')
    assert tracings_state(copy) == ('missing' if state == 'missing' else 'empty')
    rep = inspect_dataset(copy)
    assert rep['policy'] == EF_POLICY and rep['note'].startswith(f'EF-only folder: {path}') and rep['excluded'] == []
    assert len(rep['records']) == 24 and not any(r['no_tracing'] == '' for r in rep['records'])
    for policy in TRACING_POLICIES:
        with pytest.raises(EchobookDataError, match=f"{path}: {'file not found' if state == 'missing' else 'no tracings'}.*EF-only folder"):
            scan_dataset(copy, policy=policy)
    with pytest.raises(EchobookDataError, match='ef_echoapex needs the volume tracings'): require_tracings(copy, 'ef_echoapex')
    from echobook.data.kinds import format_inspection, inspect_data
    text = format_inspection(inspect_data(copy))
    assert 'EF-only folder' in text and 'without (scored from the FileList EF only): 24' in text


def test_data_and_evaluation_masks_agree(phantom_dir):
    for frames in list(read_tracings(phantom_dir).values())[:5]:
        for lines in frames.values():
            k = tracing_to_keypoints(lines)
            assert (keypoints_to_mask(k) == eval_mask(k)).all()


def test_cache_roundtrip_and_fraction(phantom_dir, tmp_path):
    cache = prepare_cache(phantom_dir, tmp_path/'cache', progress=False)
    index, kpts = read_cache_index(cache)
    assert kpts.shape == (len(index), 2, 40, 2)
    ds = LandmarkClips(cache, 'TRAIN', size=112)
    x, y = ds[0]
    assert x.shape == (3, 16, 112, 112) and float(y.min()) > 0 and float(y.max()) < 1
    with pytest.raises(EchobookDataError, match='no clips'):
        LandmarkClips(cache, 'HOLDOUT')


# ---------------------------------------------------------------------------------------------------------------------
# Data identity of the clip cache: an edited dataset is re-decoded, never served stale
# ---------------------------------------------------------------------------------------------------------------------

def _invert_video(path):
    "Rewrite a video with its frames inverted (same frame count, size and fps)."
    import cv2
    frames = read_video(path)
    fps = cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), fps, (112, 112))
    for f in frames: w.write(255 - f)
    w.release()


def _clip_files(cache):
    return {p.stem: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cache/'clips').glob('*.npy')}


def test_edited_video_is_redecoded_and_the_others_reused(copy, tmp_path):
    cache = prepare_cache(copy, tmp_path/'cache', n_frames=4, progress=False)
    before = _clip_files(cache)
    name = sorted(before)[3]
    old = load_clip(cache, name)
    _invert_video(copy/'Videos'/f'{name}.avi')
    with pytest.raises(EchobookDataError, match='changed since it was cached'):
        load_clip(cache, name)                                       # never the stale frames
    with pytest.raises(EchobookDataError, match=f'changed since the cache was prepared.*{name}.avi'):
        LandmarkClips(cache, 'TRAIN', size=32)
    prepare_cache(copy, cache, n_frames=4, progress=False)
    after = _clip_files(cache)
    new = load_clip(cache, name)
    assert np.abs(new.astype(int) - (255 - old.astype(int))).mean() < 8 and np.abs(new.astype(int) - old).mean() > 50
    assert {n: v for n, v in after.items() if n != name} == {n: v for n, v in before.items() if n != name}   # reused: same bytes, not rewritten
    meta = read_json(cache/'meta.json')
    assert (meta['n_decoded'], meta['n_reused']) == (1, len(before) - 1)
    assert len(LandmarkClips(cache, 'TRAIN', size=32)) > 0


def test_cli_prepare_redecodes_an_edited_video(copy, tmp_path):
    from echobook.cli import main
    assert main(['prepare', str(copy), str(tmp_path/'cache')]) == 0
    name = read_cache_index(tmp_path/'cache')[0].FileName[0]
    old = load_clip(tmp_path/'cache', name)
    _invert_video(copy/'Videos'/f'{name}.avi')
    assert main(['prepare', str(copy), str(tmp_path/'cache')]) == 0
    assert np.abs(load_clip(tmp_path/'cache', name).astype(int) - old).mean() > 50
    assert read_json(tmp_path/'cache'/'meta.json')['n_decoded'] == 1


def test_changed_tracings_redecode_and_removed_videos_are_dropped(copy, tmp_path):
    cache = prepare_cache(copy, tmp_path/'cache', n_frames=4, progress=False)
    index, _ = read_cache_index(cache)
    gone, moved = index.FileName[0], index.FileName[1]
    _rewrite(copy/'FileList.csv', lambda d: d[d.FileName != gone])
    with pytest.raises(EchobookDataError, match='FileList.csv'):
        read_cache_index(cache)                                      # the index (splits, EF) is stale
    tr = pd.read_csv(copy/'VolumeTracings.csv')                      # trace another beat: other ED/ES frames
    rows = tr.FileName.str.replace('.avi', '') == moved
    tr.loc[rows, 'Frame'] = tr.loc[rows, 'Frame'] - tr.loc[rows, 'Frame'].min()
    tr.to_csv(copy/'VolumeTracings.csv', index=False)
    prepare_cache(copy, cache, n_frames=4, progress=False)
    index2, _ = read_cache_index(cache)
    assert gone not in set(index2.FileName) and not (cache/'clips'/f'{gone}.npy').exists()
    rec = index2.set_index('FileName').loc[moved]
    assert min(rec.ed_frame, rec.es_frame) == 0 and read_json(cache/'clips'/f'{moved}.json')['frames'][0] == rec.ed_frame
    assert read_json(cache/'meta.json')['n_decoded'] == 1


def test_prepare_in_worker_processes_gives_the_same_cache(phantom_dir, tmp_path):
    a = prepare_cache(phantom_dir, tmp_path/'a', n_frames=4, progress=False)
    b = prepare_cache(phantom_dir, tmp_path/'b', n_frames=4, workers=2, progress=False)
    assert pd.read_csv(a/'index.csv').equals(pd.read_csv(b/'index.csv'))
    assert {n: v[0] for n, v in _clip_files(a).items()} == {n: v[0] for n, v in _clip_files(b).items()}


def test_old_cache_without_stamps_asks_for_prepare(phantom_dir, tmp_path):
    cache = prepare_cache(phantom_dir, tmp_path/'cache', n_frames=4, progress=False)
    pd.read_csv(cache/'index.csv').drop(columns=['src_size', 'src_mtime_ns']).to_csv(cache/'index.csv', index=False)
    with pytest.raises(EchobookDataError, match='older echobook'):
        read_cache_index(cache)
    prepare_cache(phantom_dir, cache, n_frames=4, progress=False)
    assert len(read_cache_index(cache)[0]) == 24


# ---------------------------------------------------------------------------------------------------------------------
# The clip dataset's options
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def cache4(phantom_dir, tmp_path_factory):
    return prepare_cache(phantom_dir, tmp_path_factory.mktemp('c4')/'cache', n_frames=4, progress=False)


def test_clip_dataset_frames_channels_and_masks(cache4):
    ds = EchoClips(cache4, 'TRAIN', size=64, frames=[0, -1], target='masks', channels=1, augment=True, seed=3)
    x, m = ds[0]
    assert x.shape == (1, 2, 64, 64) and m.shape == (2, 64, 64) and m.dtype == torch.float32
    assert 0 < m[1].sum() < m[0].sum()                               # ES cavity smaller than ED
    full = EchoClips(cache4, 'TRAIN', size=64)[0][0]
    assert full.shape == (3, 4, 64, 64) and (EchoClips(cache4, 'TRAIN', size=64, frames=[0, -1])[0][0][:, 1] == full[:, 3]).all()
    assert EchoClips(cache4, 'TRAIN', size=64, frames=2)[0][0].shape == (3, 2, 64, 64)
    with pytest.raises(ValueError, match='target'):
        EchoClips(cache4, target='volume')


def test_ef_target_excludes_videos_without_ef(cache4, tmp_path):
    import shutil as sh
    c = tmp_path/'c'; sh.copytree(cache4, c)
    index = pd.read_csv(c/'index.csv')
    train = index.FileName[index.Split == 'TRAIN'].tolist()
    index.loc[index.FileName == train[0], 'ef_filelist'] = np.nan
    index.to_csv(c/'index.csv', index=False)
    ds = EchoClips(c, 'TRAIN', size=32, target='ef')
    assert len(ds) == len(train) - 1 and list(ds.excluded.FileName) == [train[0]] and 'ef_filelist' in ds.excluded.reason.iloc[0]
    assert all(np.isfinite(float(ds[i][1])) for i in range(len(ds)))
    assert len(EchoClips(c, 'TRAIN', size=32, target='ef_tracings')) == len(train)


def test_show_tracing_outside_a_notebook(phantom_dir):
    "data.show_tracing imports matplotlib itself (it used `plt` without importing it)."
    import subprocess, sys
    code = ('from echobook.data.echonet import scan_dataset, show_tracing\n'
            f'axs = show_tracing(scan_dataset({str(phantom_dir)!r}, check_videos=False).records[0])\n'
            'assert len(axs) == 2 and axs[0].get_title().startswith("ED")\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**__import__('os').environ, 'MPLBACKEND': 'Agg'}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
