"""Data-layer checks for quirks of the real EchoNet-Dynamic release that the phantom does not produce by itself."""
import shutil
import numpy as np
import pandas as pd
import pytest

from echobook.data.echonet import (EchobookDataError, read_filelist, read_tracings, scan_dataset, inspect_dataset,
                           prepare_cache, read_cache_index, LandmarkClips, tracing_to_keypoints, keypoints_to_mask)
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
