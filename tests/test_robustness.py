"""Robustness: a corpus of broken inputs (each must give a clear message naming the file, or an exclusion with a reason,
never a crash halfway through an epoch) and faults (a full disk never leaves a half-written run marked done). Faults
during training (kill, crash, resume, determinism) are in test_training.py."""
import errno, json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from echobook.data.echonet import (EchobookDataError, inspect_dataset, read_filelist, read_tracings, read_video, scan_dataset,
                                   video_header, write_broken_copy)
from echobook.data.clips import LandmarkClips, load_clip, prepare_cache, read_cache_index
import echobook.core as core_mod
from echobook.core import atomic_write_text
from echobook.runs import RunDir, fail_run, finish_run, start_run

TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------------------------------------------------
# The corpus of broken inputs
# ---------------------------------------------------------------------------------------------------------------------

def _write_video(path, frames, size=(112, 112), fourcc='MJPG'):
    "A valid video of `frames` grey frames of `size` (H, W)."
    h, w = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 50, (w, h))
    for i in range(frames): vw.write(np.full((h, w, 3), 40 + i % 100, np.uint8))
    vw.release()


# FileName → (what was broken, a substring the exclusion reason must contain)
def make_broken_corpus(src, dst) -> dict:
    "Copy the phantom at `src` to `dst` and break 15 of its videos, one problem each (the rest stay good)."
    problems = write_broken_copy(src, dst)   # videos 0-7: truncated, empty, not found, 20 lines, HOLDOUT, ED == ES, 1 frame, dup
    fl, tr = pd.read_csv(dst/'FileList.csv'), pd.read_csv(dst/'VolumeTracings.csv')
    names = list(dict.fromkeys(fl.FileName))
    vid = lambda i: dst/'Videos'/f'{names[i]}.avi'
    expected = {names[0]: ('truncated AVI', 'truncated'), names[1]: ('zero-byte AVI', '0 bytes'),
                names[2]: ('missing AVI', 'not found'), names[3]: ('a tracing with 20 lines', '21 lines'),
                names[4]: ('unknown split name', 'unknown split HOLDOUT'), names[5]: ('ED and ES traced on one frame', 'ED == ES'),
                names[6]: ('one-frame video', '1 frame'), names[7]: ('duplicated FileList row', 'duplicated FileList row')}
    assert set(problems) == {*names[:7], f'{names[7]} (duplicate row)'}
    vid(8).write_bytes(np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes())
    expected[names[8]] = ('random bytes named .avi', 'cannot open video')
    data = vid(9).read_bytes(); assert data.count(b'MJPG') == 2
    vid(9).write_bytes(data.replace(b'MJPG', b'ZZZZ'))
    expected[names[9]] = ('unknown codec (FourCC ZZZZ)', 'unsupported codec')
    data = vid(10).read_bytes(); vid(10).write_bytes(data.replace(b'MJPG', b'H264'))
    expected[names[10]] = ('wrong codec: MJPG frames declared as H264', 'no frame could be decoded')
    tr = tr[tr.FileName.str.replace('.avi', '') != names[11]]
    expected[names[11]] = ('no tracings', 'no tracings')
    _write_video(vid(12), 260, size=(120, 160))
    expected[names[12]] = ('non-112 video (160×120)', '112×112')
    vid(13).write_text('FileName,EF\nthis is not a video\n')
    expected[names[13]] = ('a CSV file named .avi', 'cannot open video')
    _write_video(vid(14), 5)
    expected[names[14]] = ('video shorter than its traced frames', 'beyond the last frame')
    fl = fl.astype({'EF': float}); fl.loc[fl.FileName == names[15], 'EF'] = np.nan   # NaN EF: kept for landmarks (EF unused)
    fl.to_csv(dst/'FileList.csv', index=False); tr.to_csv(dst/'VolumeTracings.csv', index=False)
    return expected


@pytest.fixture(scope='module')
def corpus(phantom_dir, tmp_path_factory):
    "The broken copy, its expected problems and a cache prepared from it (4 frames per clip: fast)."
    root = tmp_path_factory.mktemp('broken')
    expected = make_broken_corpus(phantom_dir, root/'data')
    cache = prepare_cache(root/'data', root/'cache', n_frames=4, progress=False)
    return root/'data', expected, cache


def test_every_broken_input_is_excluded_with_its_reason(corpus):
    data, expected, cache = corpus
    excluded = pd.read_csv(cache/'excluded.csv')
    reasons = excluded.groupby('FileName').reason.apply(list).to_dict()
    for name, (what, needle) in expected.items():
        assert name in reasons, f'{what} ({name}) was not excluded'
        assert len(reasons[name]) == 1 and needle in reasons[name][0], f'{what}: reason {reasons[name]!r} lacks {needle!r}'
    index, kpts = read_cache_index(cache)
    broken = set(expected) - {list(expected)[7]}   # the first of the duplicated rows is a good video
    assert not broken & set(index.FileName), 'a broken video reached the cache'
    assert list(expected)[7] in set(index.FileName)
    good = set(read_filelist(data).FileName) - set(expected)
    assert good <= set(index.FileName) and len(index) == len(good) + 1
    assert np.isfinite(kpts).all()


def test_nan_ef_is_kept_and_reported_as_null(corpus):
    "EF is not used by the landmark task: a NaN EF keeps the video; the data report writes it as JSON null, not NaN."
    data, _, cache = corpus
    name = read_filelist(data).FileName[15]
    index, _ = read_cache_index(cache)
    assert name in set(index.FileName) and index.set_index('FileName').ef_filelist.isna()[name]
    report = inspect_dataset(data, check_videos=False)
    rec = next(r for r in report['records'] if r['FileName'] == name)
    assert np.isnan(rec['ef_filelist']) and np.isfinite(rec['ef_tracings'])
    from echobook.core import atomic_write_json
    atomic_write_json(cache.parent/'report.json', report)
    assert json.loads((cache.parent/'report.json').read_text())  # strict JSON: NaN → null


@pytest.mark.parametrize('workers', [0, 2])
def test_an_epoch_over_a_cache_of_broken_data_never_crashes(corpus, workers):
    "Every clip of the cache built from the broken copy loads, resized and augmented, through a DataLoader."
    _, _, cache = corpus
    index, _ = read_cache_index(cache)
    ds = LandmarkClips(cache, names=index.FileName, size=32, augment=True)
    n = 0
    for x, y in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 4, 32, 32) and torch.isfinite(y).all()
        n += len(x)
    assert n == len(index)


@pytest.mark.parametrize('i', [0, 1, 2, 8, 9, 10, 13])
def test_reading_a_broken_video_names_the_file(corpus, i):
    "Direct reads of the unreadable videos raise EchobookDataError whose message starts with the file's path."
    data, expected, _ = corpus
    path = data/'Videos'/f'{list(expected)[i]}.avi'
    with pytest.raises(EchobookDataError) as e:
        read_video(path) if i in (0, 10) else video_header(path)   # truncated / mislabelled: the header still opens
    assert str(e.value).startswith(str(path)) and e.value.problem


def test_broken_csv_files_name_the_file(phantom_dir, tmp_path, capsys):
    "Missing, empty, binary or column-less CSVs: EchobookDataError naming the CSV; the CLI prints it, exit code 2."
    from echobook.cli import main
    cases = {'missing FileList': lambda d: (d/'FileList.csv').unlink(),
             'empty VolumeTracings': lambda d: (d/'VolumeTracings.csv').write_bytes(b''),
             'binary FileList': lambda d: (d/'FileList.csv').write_bytes(bytes(range(256)) * 8),
             'FileList without Split': lambda d: pd.read_csv(d/'FileList.csv').drop(columns='Split').to_csv(d/'FileList.csv', index=False),
             'text in a tracing coordinate': lambda d: (d/'VolumeTracings.csv').write_text(
                 (d/'VolumeTracings.csv').read_text().replace('\n', '\nxx,abc,2,3,4,5\n', 1))}
    for what, breaker in cases.items():
        d = tmp_path/what.replace(' ', '_')
        shutil.copytree(phantom_dir, d, ignore=shutil.ignore_patterns('*.avi'))
        breaker(d)
        csv = 'FileList.csv' if 'FileList' in what else 'VolumeTracings.csv'
        with pytest.raises(EchobookDataError, match=str(d/csv).replace('\\', '\\\\')):
            scan_dataset(d, check_videos=False)
    assert main(['prepare', str(tmp_path/'missing_FileList'), str(tmp_path/'c')]) == 2
    assert f"error: {tmp_path/'missing_FileList'/'FileList.csv'}: file not found" in capsys.readouterr().err


def test_unreadable_cache_file_names_the_file(corpus, tmp_path):
    "A corrupted clip file: EchobookDataError naming it (in the main process and through DataLoader workers)."
    _, _, cache = corpus
    copy = tmp_path/'cache'; shutil.copytree(cache, copy)
    index, _ = read_cache_index(copy)
    clip = copy/'clips'/f'{index.FileName[2]}.npy'
    clip.write_bytes(clip.read_bytes()[:1000])                   # truncated
    (copy/'clips'/f'{index.FileName[3]}.npy').write_bytes(b'not a numpy file')
    with pytest.raises(EchobookDataError, match=str(clip)):
        load_clip(copy, index.FileName[2])
    ds = LandmarkClips(copy, names=index.FileName, size=32)
    with pytest.raises(Exception, match=str(clip)) as e:
        for _ in torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1): pass


@pytest.mark.parametrize('name', ['index.csv', 'keypoints.npy'])
def test_unreadable_cache_index_names_the_file(corpus, tmp_path, name):
    _, _, cache = corpus
    copy = tmp_path/'cache'; shutil.copytree(cache, copy)
    (copy/name).write_bytes(b'')
    with pytest.raises(EchobookDataError, match=name):
        read_cache_index(copy)


def test_prepare_cache_repairs_a_corrupted_clip(corpus, tmp_path):
    data, _, cache = corpus
    copy = tmp_path/'cache'; shutil.copytree(cache, copy)
    index, _ = read_cache_index(copy)
    (copy/'clips'/f'{index.FileName[0]}.npy').write_bytes(b'garbage')
    prepare_cache(data, copy, n_frames=4, progress=False)
    assert load_clip(copy, index.FileName[0]).shape[0] == 4


def test_non_numeric_filelist_size_is_an_exclusion(phantom_dir, tmp_path):
    d = tmp_path/'data'; shutil.copytree(phantom_dir, d)
    fl = pd.read_csv(d/'FileList.csv').astype({'NumberOfFrames': object}); fl.loc[0, 'NumberOfFrames'] = ''
    fl.to_csv(d/'FileList.csv', index=False)
    ex = scan_dataset(d).excluded
    assert fl.FileName[0] in set(ex.FileName)


def test_data_error_survives_pickling():
    import pickle
    e = pickle.loads(pickle.dumps(EchobookDataError('/x/a.avi', 'bad')))
    assert isinstance(e, EchobookDataError) and e.path == '/x/a.avi' and e.problem == 'bad'


# ---------------------------------------------------------------------------------------------------------------------
# Faults while writing a run: the disk fills up
# ---------------------------------------------------------------------------------------------------------------------

CONFIG = dict(experiment='robustness', encoder='resnet18_2d.in1k', k=8, seed=0)
METRICS = dict(summary={'model/dice_ed/mean': 0.9, 'model/mke_ed/mean': 1.5}, n_test=3, note='x' * 3000)
PREDICTIONS = 'FileName,phase,point,x,y\n' + ''.join(f'video{i},ED,{i % 40},{i * 0.1:.2f},{i * 0.2:.2f}\n' for i in range(2000))


def write_run(folder):
    "What an experiment notebook writes, in its order: start, results, metrics + done; `fail_run` on an error."
    run = start_run(folder, CONFIG)
    try:
        atomic_write_text(run.file('predictions.csv'), PREDICTIONS)
        finish_run(run, METRICS)
    except BaseException as e:
        try: fail_run(run, e)
        except OSError: pass   # the disk is still full: the status stays 'running' (then 'interrupted' once we exit)
        raise
    return run


class _Disk:
    "os.fdopen for echobook.core (where every atomic write happens) whose files raise ENOSPC once `quota` bytes have been written (then always)."
    def __init__(self, quota): self.quota, self.used = quota, 0
    def fdopen(self, fd, mode='r', *a, **kw):
        f, disk = os.fdopen(fd, mode, *a, **kw), self
        class Full:
            def __enter__(self): return self
            def __exit__(self, *exc): f.close()
            def write(self, data):
                room = max(disk.quota - disk.used, 0)
                f.write(data[:room]); disk.used += min(room, len(data))
                if len(data) > room: raise OSError(errno.ENOSPC, 'No space left on device')
                return len(data)
            def __getattr__(self, name): return getattr(f, name)
        return Full()


class _OsWith:
    "The os module, with `fdopen` replaced."
    def __init__(self, fdopen): self._fdopen = fdopen
    def __getattr__(self, name): return self._fdopen if name == 'fdopen' else getattr(os, name)


def _check_no_half_written_run(folder, ref_files):
    "Not done unless complete; no temporary files; every file present is complete (the same bytes as a full run's)."
    run = RunDir(folder)
    names = {p.name for p in Path(folder).iterdir()} if Path(folder).exists() else set()
    assert not [n for n in names if n.endswith('.tmp')], f'temporary files left: {names}'
    for n in names & {'predictions.csv', 'metrics.json', 'config.json'}:
        assert (Path(folder)/n).read_bytes() == ref_files[n], f'{n} is half written'
    for n in names & {'status.json', 'env.json'}: json.loads((Path(folder)/n).read_text())   # parses: complete
    if 'attempts.jsonl' in names: run.attempts   # every line parses: complete
    return run.state


def test_disk_full_at_any_point_never_leaves_a_half_written_run_marked_done(tmp_path, monkeypatch):
    "Fill the disk after every possible number of bytes: the run is either complete and done, or not done and clean."
    write_run(tmp_path/'full')
    ref = {p.name: p.read_bytes() for p in (tmp_path/'full').iterdir()}
    total = sum(len(v) for v in ref.values())
    states = {}
    for quota in sorted({*range(0, total + 2000, max(total // 40, 1)), *np.cumsum([len(v) for v in ref.values()]).tolist()}):
        disk = _Disk(quota)
        monkeypatch.setattr(core_mod, 'os', _OsWith(disk.fdopen))
        folder = tmp_path/f'q{quota}'
        try: write_run(folder); error = None
        except OSError as e: error = e
        monkeypatch.setattr(core_mod, 'os', os)
        state = _check_no_half_written_run(folder, ref)
        if error is None: assert state == 'done' and {p.name for p in folder.iterdir()} == set(ref)
        else:
            assert error.errno == errno.ENOSPC and state != 'done', f'quota {quota}: {state}'
            assert not (folder/'metrics.json').exists() or state == 'running'
        states[quota] = state
    assert set(states.values()) >= {'new', 'running', 'done'}, states
    # the disk has room again: the same run folder can be written to the end
    write_run(tmp_path/f'q{min(states)}')
    assert RunDir(tmp_path/f'q{min(states)}').state == 'done'


TMPFS_CHILD = '''
import json, subprocess, sys
from pathlib import Path
from echobook.core import atomic_write_text
from echobook.runs import RunDir, fail_run, finish_run, start_run
mnt, out = Path(sys.argv[1]), []
CONFIG, METRICS, PREDICTIONS = {config!r}, {metrics!r}, {predictions!r}
{write_run}
def attempt():
    try: write_run(mnt/'run'); r = dict(ok=True)
    except OSError as e: r = dict(ok=False, errno=e.errno, error=str(e))
    run = RunDir(mnt/'run')
    return dict(r, state=run.state, files=sorted(p.name for p in run.path.iterdir()))
out.append(attempt())
subprocess.run(['mount', '-o', 'remount,size=4m', str(mnt)], check=True)   # the disk has room again
out.append(attempt())
print(json.dumps(out))
'''


def _tmpfs_available() -> bool:
    if not shutil.which('unshare'): return False
    r = subprocess.run(['unshare', '-r', '-m', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs /mnt && echo ok'],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and 'ok' in r.stdout


@pytest.mark.skipif(not sys.platform.startswith('linux') or not _tmpfs_available(),
                    reason='needs a user namespace able to mount a tmpfs (unshare -r -m)')
def test_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    "A 64 KiB tmpfs fills while the predictions are written: failed, clean; once it has room the run completes."
    import inspect
    mnt, script = tmp_path/'mnt', tmp_path/'child.py'
    mnt.mkdir()
    script.write_text(TMPFS_CHILD.format(config=CONFIG, metrics=METRICS, predictions=PREDICTIONS, write_run=inspect.getsource(write_run)))
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    sh = f"mount -t tmpfs -o size=64k tmpfs {mnt} && {sys.executable} {script} {mnt}"
    r = subprocess.run(['unshare', '-r', '-m', 'sh', '-c', sh], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    full, room = json.loads(r.stdout.strip().splitlines()[-1])
    assert not full['ok'] and full['errno'] == errno.ENOSPC and 'No space left' in full['error']
    assert full['state'] == 'failed'                       # fail_run could still write the (small) status
    assert not [f for f in full['files'] if f.endswith('.tmp')]
    assert 'predictions.csv' not in full['files'] and 'metrics.json' not in full['files']   # no half-written result
    assert room['ok'] and room['state'] == 'done'
    assert set(room['files']) == {'attempts.jsonl', 'config.json', 'env.json', 'status.json', 'predictions.csv', 'metrics.json'}
