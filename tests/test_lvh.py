"""EchoNet-LVH: the PLAX phantom in the release layout, the reader, its exclusions and errors, the kind, the CLI."""
import json, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from echobook.core import EchobookDataError
from echobook.data.echonet import read_video
from echobook.data.lvh import (LVH_BATCHES, LVH_COLUMNS, LVH_CSV, LVH_SPLITS, annotations, inspect_lvh, format_lvh,
                               make_lvh_phantom, scan_lvh)


@pytest.fixture(scope='module')
def lvh_dir(tmp_path_factory):
    return make_lvh_phantom(tmp_path_factory.mktemp('lvh')/'data', n_videos=8, seed=3)


def _mean_along(frame, pts, lo=.2, hi=.8):
    "Mean grey level on the middle part of the segment pts[0] -> pts[1]."
    t = np.linspace(lo, hi, 15)[:, None]
    xy = np.round(pts[0] + t*(pts[1] - pts[0])).astype(int)
    return frame[xy[:, 1], xy[:, 0], 0].mean()


def test_phantom_layout(lvh_dir):
    "MeasurementsList.csv: the release's columns in order after an unnamed index column; Batch1-4 hold the AVIs."
    header = (lvh_dir/LVH_CSV).read_text().splitlines()[0].split(',')
    assert header == ['Unnamed: 0', *LVH_COLUMNS]                       # as zea's fixture of the release writes it
    raw = pd.read_csv(lvh_dir/LVH_CSV)
    assert list(raw.columns) == ['Unnamed: 0', *LVH_COLUMNS] and len(raw) == 8*4
    assert sorted(p.name for p in lvh_dir.iterdir()) == sorted([*LVH_BATCHES, LVH_CSV])
    assert raw.HashedFileName.str.fullmatch(r'0X[0-9A-F]{16}').all()
    assert set(raw.split) == set(LVH_SPLITS) and set(raw.Calc) == {'IVSd', 'LVIDd', 'LVPWd', 'LVIDs'}
    avis = {p.stem: p.parent.name for p in lvh_dir.glob('Batch*/*.avi')}
    assert set(avis) == set(raw.HashedFileName) and len(set(avis.values())) == 4


def test_phantom_round_trip(lvh_dir):
    "The reader reads what the phantom wrote: frames, sizes, endpoints on the drawn boundaries, CalcValue = length x spacing."
    scan = scan_lvh(lvh_dir)
    assert (len(scan.videos), len(scan.measurements), len(scan.excluded)) == (8, 32, 0)
    assert not scan.videos.header_mismatch.any()
    spacing = scan.measurements.groupby('HashedFileName').cm_per_px
    assert (spacing.max() - spacing.min()).max() < 2e-3                       # one pixel spacing per video
    assert spacing.median().between(0.1, 0.13).all()
    for v in scan.videos.itertuples():
        frames = read_video(v.path)
        assert frames.shape[:3] == (v.n_frames, v.height, v.width)
        ann = annotations(scan, v.HashedFileName)
        ed = next(f for f, a in ann.items() if 'IVSd' in a)
        es = next(f for f, a in ann.items() if 'LVIDs' in a)
        assert set(ann[ed]) == {'IVSd', 'LVIDd', 'LVPWd'} and set(ann[es]) == {'LVIDs'} and ed < es == v.frames[-1]
        (ivs, _), (lvid, lvidd), (lvpw, _) = ann[ed]['IVSd'], ann[ed]['LVIDd'], ann[ed]['LVPWd']
        np.testing.assert_allclose(ivs[1], lvid[0], atol=0.011)             # calipers meet on the septum's LV side
        np.testing.assert_allclose(lvid[1], lvpw[0], atol=0.011)            # ... and on the posterior wall's endocardium
        assert ann[es]['LVIDs'][1] < lvidd
        muscle = min(_mean_along(frames[ed], ivs), _mean_along(frames[ed], lvpw))
        assert _mean_along(frames[ed], lvid) < 0.5*muscle                     # blood between the walls
        assert _mean_along(frames[es], ann[es]['LVIDs'][0]) < 0.5*muscle
        # just beyond the LV side of the septum is blood; just before it, muscle (the endpoint is on the boundary)
        d = (lvid[1] - lvid[0])/np.linalg.norm(lvid[1] - lvid[0])
        assert _mean_along(frames[ed], np.stack([ivs[1] + 2*d, ivs[1] + 5*d]), 0, 1) < _mean_along(frames[ed], np.stack([ivs[1] - 5*d, ivs[1] - 2*d]), 0, 1)


def test_phantom_is_deterministic(lvh_dir, tmp_path):
    make_lvh_phantom(tmp_path/'again', n_videos=8, seed=3)
    assert (tmp_path/'again'/LVH_CSV).read_text() == (lvh_dir/LVH_CSV).read_text()


def _broken(lvh_dir, tmp_path, edit):
    "A copy of the phantom whose MeasurementsList.csv `edit(df, first_video_name, folder)` changed."
    dst = tmp_path/'bad'
    shutil.copytree(lvh_dir, dst)
    ml = pd.read_csv(dst/LVH_CSV, index_col=0)
    name = ml.HashedFileName.iloc[0]
    edit(ml, name, dst)
    ml.to_csv(dst/LVH_CSV)
    return dst, name


def _first(ml, name): return ml.index[ml.HashedFileName == name][0]

def _avi(dst, name): return next(p for b in LVH_BATCHES if (p := dst/b/f'{name}.avi').exists())

CASES = {
    'unknown split': (lambda ml, n, d: ml.__setitem__('split', ml.split.where(ml.HashedFileName != n, 'Train')),
                      ["unknown split 'Train'", 'MeasurementsList.csv line 2']),
    'endpoint outside': (lambda ml, n, d: ml.__setitem__('X1', ml.X1.where(ml.index != _first(ml, n), -3.0)),
                         ['endpoint X1=-3', 'outside the 144×128 frame', '.avi']),
    'frame beyond video': (lambda ml, n, d: ml.__setitem__('Frame', ml.Frame.where(ml.index != _first(ml, n), 400)),
                           ['Frame 400', "is not one of the video's", '.avi']),
    'non-finite': (lambda ml, n, d: ml.__setitem__('Y2', ml.Y2.where(ml.index != _first(ml, n), np.inf)),
                   ['non-finite Y2', 'MeasurementsList.csv line 2']),
    'missing video': (lambda ml, n, d: _avi(d, n).unlink(), ['.avi (listed in MeasurementsList.csv) not found in any of Batch1']),
    'unreadable video': (lambda ml, n, d: _avi(d, n).write_bytes(b'\0' * 64), ['Batch1/', '.avi: cannot open video']),
    'empty video': (lambda ml, n, d: _avi(d, n).write_bytes(b''), ['Batch1/', '.avi: video file is empty']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_video_is_excluded_with_reason(lvh_dir, tmp_path, case):
    "Each video-level problem excludes that video only, with a reason naming the file (CSV line or video)."
    edit, expected = CASES[case]
    dst, name = _broken(lvh_dir, tmp_path, edit)
    scan = scan_lvh(dst)
    assert len(scan.videos) == 7 and name not in set(scan.videos.HashedFileName)
    assert scan.excluded.HashedFileName.tolist() == [name]
    reason = scan.excluded.reason.iloc[0]
    assert name in reason and all(e in reason for e in expected), reason
    report = inspect_lvh(dst)
    assert report['videos'] == 7 and report['excluded'][0]['reason'] == reason and reason in format_lvh(report)


def test_folder_errors_name_the_file(lvh_dir, tmp_path):
    (tmp_path/'empty'/'Batch1').mkdir(parents=True)
    with pytest.raises(EchobookDataError, match='MeasurementsList.csv: file not found'): scan_lvh(tmp_path/'empty')
    dst, _ = _broken(lvh_dir, tmp_path, lambda ml, n, d: None)
    pd.read_csv(dst/LVH_CSV, index_col=0).drop(columns=['Y1', 'split']).to_csv(dst/LVH_CSV)
    with pytest.raises(EchobookDataError, match=r"MeasurementsList.csv: missing columns \['Y1', 'split'\]"): scan_lvh(dst)
    (tmp_path/'nobatch').mkdir(); shutil.copy(lvh_dir/LVH_CSV, tmp_path/'nobatch')
    with pytest.raises(EchobookDataError, match='nobatch: no Batch folders'): scan_lvh(tmp_path/'nobatch')


def test_csv_without_videos_check(lvh_dir):
    "check_videos=False trusts Frames/Width/Height of the CSV and still finds every video."
    assert inspect_lvh(lvh_dir, check_videos=False)['videos'] == 8


def test_kind_detection_and_dispatch(lvh_dir, tmp_path):
    from echobook.data.kinds import KINDS, detect_kind, inspect_data, format_inspection, prepare_data, write_phantom
    assert 'lvh' in KINDS and detect_kind(lvh_dir) == 'lvh'
    (tmp_path/'csv-only').mkdir(); shutil.copy(lvh_dir/LVH_CSV, tmp_path/'csv-only')
    with pytest.raises(EchobookDataError, match='cannot tell the dataset kind'): detect_kind(tmp_path/'csv-only')
    assert write_phantom(tmp_path/'w', 'lvh', videos=3, seed=1, progress=False) == '3 PLAX phantom videos (EchoNet-LVH layout)'
    report = inspect_data(tmp_path/'w')
    assert report['kind'] == 'lvh' and report['videos'] == 3 and 'EchoNet-LVH' in format_inspection(report)
    with pytest.raises(ValueError, match='not supported yet'): prepare_data(lvh_dir, tmp_path/'cache')


def test_cli_phantom_and_inspect(lvh_dir, tmp_path, capsys):
    "`echobook inspect` detects and reports an EchoNet-LVH folder; `echobook phantom OUT --kind lvh` writes one."
    from echobook.cli import main
    assert main(['inspect', str(lvh_dir)]) == 0
    out = capsys.readouterr().out
    assert 'EchoNet-LVH' in out and '8 usable videos' in out and 'LVIDd' in out
    assert main(['inspect', str(lvh_dir), '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['kind'] == 'lvh' and report['measurements'] == 32
    code = main(['phantom', str(tmp_path/'cli'), '--kind', 'lvh', '--videos', '4'])
    err = capsys.readouterr().err
    if code == 2 and "invalid choice: 'lvh'" in err:
        pytest.skip("the CLI's --kind choices lack 'lvh' (requested from nbs/11_cli.ipynb's owner in /tmp/contract/requests/lvh.md)")
    assert code == 0, err
    assert main(['inspect', str(tmp_path/'cli')]) == 0
    assert '4 usable videos' in capsys.readouterr().out
