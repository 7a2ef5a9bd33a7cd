"""EchoNet-Pediatric: the two-view phantom in the release layout, the reader, its exclusions and errors, the kind, the CLI."""
import json, shutil

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from echobook.core import EchobookDataError
from echobook.data.echonet import read_video
from echobook.data.pediatric import (PED_FILELIST, PED_FILELIST_COLUMNS, PED_TRACINGS, PED_TRACING_COLUMNS, PED_VIEWS,
                                     format_pediatric, inspect_pediatric, lv_mask, make_pediatric_phantom, ped_volume,
                                     scan_pediatric)


@pytest.fixture(scope='module')
def ped_dir(tmp_path_factory):
    return make_pediatric_phantom(tmp_path_factory.mktemp('ped')/'data', n_videos=12, seed=5)


def test_phantom_layout(ped_dir):
    "A4C/ and PSAX/, each FileList.csv, VolumeTracings.csv (the confirmed columns, in order) and Videos/*.avi."
    assert sorted(p.name for p in ped_dir.iterdir()) == list(PED_VIEWS)
    for v in PED_VIEWS:
        assert sorted(p.name for p in (ped_dir/v).iterdir()) == sorted([PED_FILELIST, PED_TRACINGS, 'Videos'])
        assert (ped_dir/v/PED_FILELIST).read_text().splitlines()[0] == ','.join(PED_FILELIST_COLUMNS)
        assert (ped_dir/v/PED_TRACINGS).read_text().splitlines()[0] == ','.join(PED_TRACING_COLUMNS)
        fl, tr = pd.read_csv(ped_dir/v/PED_FILELIST), pd.read_csv(ped_dir/v/PED_TRACINGS)
        assert len(fl) == 6 and fl.Split.between(0, 9).all() and fl.Split.nunique() == 6
        assert tr.FileName.str.endswith('.avi').all() and set(tr.FileName.str[:-4]) == set(fl.FileName)
        assert (tr.groupby('FileName').Frame.nunique() == 2).all()
        assert {p.stem for p in (ped_dir/v/'Videos').glob('*.avi')} == set(fl.FileName)


def test_phantom_round_trip(ped_dir):
    "Traced frames inside the video, masks non-empty and inside the frame, ED area > ES area, EF = traced volumes' EF."
    scan = scan_pediatric(ped_dir)
    assert (len(scan.videos), len(scan.excluded)) == (12, 0)
    assert scan.videos.groupby('view').size().to_dict() == {'A4C': 6, 'PSAX': 6}
    for r in scan.videos.itertuples():
        frames = read_video(r.path)
        assert frames.shape[:3] == (r.n_frames, r.height, r.width) and max(r.traced_frames) < r.n_frames
        assert len(r.traced_frames) == 2 and r.ed_area > r.es_area and min(r.points) >= 3
        cs = scan.contours[(r.view, r.FileName)]
        ef = 100*(1 - ped_volume(cs[r.es_frame], r.view)/ped_volume(cs[r.ed_frame], r.view))
        assert abs(ef - r.EF) < 0.01
        ed, es = (lv_mask(scan, r.view, r.FileName, f) for f in (r.ed_frame, r.es_frame))
        assert ed.shape == (r.height, r.width) and ed.sum() > es.sum() > 50
        assert not (ed[0].any() or ed[-1].any() or ed[:, 0].any() or ed[:, -1].any())
        img = frames[r.ed_frame, ..., 0].astype(float)
        ring = binary_dilation(ed, iterations=4) & ~binary_dilation(ed, iterations=1)
        assert img[binary_erosion(ed, iterations=2)].mean() < 0.6*img[ring].mean()   # dark blood inside, bright wall around
    with pytest.raises(KeyError, match='is not traced'): lv_mask(scan, r.view, r.FileName, r.n_frames + 5)


def test_phantom_is_deterministic(ped_dir, tmp_path):
    make_pediatric_phantom(tmp_path/'again', n_videos=12, seed=5)
    for v in PED_VIEWS:
        for f in (PED_FILELIST, PED_TRACINGS): assert (tmp_path/'again'/v/f).read_text() == (ped_dir/v/f).read_text()


def _broken(ped_dir, tmp_path, view, edit_fl=None, edit_tr=None, video=None):
    "A copy of the phantom with `view`'s CSVs edited (str frames; an edit returns a new frame or edits in place) or its first video replaced."
    dst = tmp_path/'bad'
    shutil.copytree(ped_dir, dst)
    fl, tr = pd.read_csv(dst/view/PED_FILELIST, dtype=str), pd.read_csv(dst/view/PED_TRACINGS, dtype=str)
    name = fl.FileName[0]
    if edit_fl:
        new = edit_fl(fl, name)
        (fl if new is None else new).to_csv(dst/view/PED_FILELIST, index=False)
    if edit_tr:
        new = edit_tr(tr, name)
        (tr if new is None else new).to_csv(dst/view/PED_TRACINGS, index=False)
    avi = dst/view/'Videos'/f'{name}.avi'
    if video == 'delete': avi.unlink()
    elif video is not None: avi.write_bytes(video)
    return dst, name


def _rows(tr, n): return tr.index[tr.FileName == f'{n}.avi']

CASES = {
    'unknown split': (dict(edit_fl=lambda fl, n: fl.loc.__setitem__((0, 'Split'), 'TRAIN')),
                      ["PSAX/FileList.csv line 2", "unknown split 'TRAIN'"]),
    'non-finite EF': (dict(edit_fl=lambda fl, n: fl.loc.__setitem__((0, 'EF'), 'nan')), ['PSAX/FileList.csv line 2', 'non-finite EF']),
    'frame beyond video': (dict(edit_tr=lambda tr, n: tr.loc.__setitem__((_rows(tr, n), 'Frame'), '400')),
                           ['PSAX/Videos/', '.avi: traced Frame 400', "is not one of the video's"]),
    'point outside': (dict(edit_tr=lambda tr, n: tr.loc.__setitem__((_rows(tr, n)[0], 'X'), '-3')),
                      ['PSAX/Videos/', 'point X=-3', 'VolumeTracings.csv line', 'outside the 112×112 frame']),
    'fewer than 3 points': (dict(edit_tr=lambda tr, n: tr.drop(_rows(tr, n)[2:])), ['PSAX/VolumeTracings.csv line', 'has 2 point(s)']),
    'non-finite point': (dict(edit_tr=lambda tr, n: tr.loc.__setitem__((_rows(tr, n)[0], 'Y'), 'inf')),
                         ['PSAX/VolumeTracings.csv line', 'non-finite Y']),
    'missing video': (dict(video='delete'), ['PSAX/Videos/', '(listed in PSAX/FileList.csv line 2) not found']),
    'unreadable video': (dict(video=b'\0'*64), ['PSAX/Videos/', '.avi: cannot open video']),
    'empty video': (dict(video=b''), ['PSAX/Videos/', '.avi: video file is empty']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_video_is_excluded_with_reason(ped_dir, tmp_path, case):
    "Each video-level problem excludes that video only, with a reason naming the file (CSV line or video)."
    kw, expected = CASES[case]
    dst, name = _broken(ped_dir, tmp_path, 'PSAX', **kw)
    scan = scan_pediatric(dst)
    assert len(scan.videos) == 11 and (('PSAX', name) not in scan.contours)
    assert scan.excluded.FileName.tolist() == [name] and scan.excluded.view.tolist() == ['PSAX']
    reason = scan.excluded.reason.iloc[0]
    assert name in reason and all(e in reason for e in expected), reason
    report = inspect_pediatric(dst)
    assert report['videos'] == 11 and report['views']['PSAX']['excluded'] == 1 and reason in format_pediatric(report)


def test_phase_marker_rows_are_not_frames(ped_dir, tmp_path):
    "A 'No Systolic' row (the release's missing-phase marker) is counted, not read as a traced frame."
    def edit(tr, n):
        rows = _rows(tr, n)
        keep = tr.drop(rows[tr.loc[rows, 'Frame'] == tr.loc[rows, 'Frame'].max()])   # drop the later traced frame
        return pd.concat([keep, pd.DataFrame([dict(FileName=f'{n}.avi', X='', Y='', Frame='No Systolic')])], ignore_index=True)
    dst, name = _broken(ped_dir, tmp_path, 'A4C', edit_tr=edit)
    scan = scan_pediatric(dst)
    r = scan.videos.set_index(['view', 'FileName']).loc[('A4C', name)]
    assert len(scan.excluded) == 0 and len(r.traced_frames) == 1 and r.markers == ['No Systolic'] and pd.isna(r.ed_frame)
    assert inspect_pediatric(dst)['views']['A4C']['phase_markers'] == 1


def test_folder_errors_name_the_file(ped_dir, tmp_path):
    (tmp_path/'empty').mkdir()
    with pytest.raises(EchobookDataError, match='no A4C/ or PSAX/ folder'): scan_pediatric(tmp_path/'empty')
    for missing, match in ((PED_FILELIST, 'A4C/FileList.csv: file not found'), (PED_TRACINGS, 'A4C/VolumeTracings.csv: file not found'),
                           ('Videos', 'A4C/Videos: folder not found')):
        dst = tmp_path/missing
        shutil.copytree(ped_dir, dst)
        p = dst/'A4C'/missing
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        with pytest.raises(EchobookDataError, match=match): scan_pediatric(dst)
        assert len(scan_pediatric(dst, view='PSAX').videos) == 6                 # the other view still reads
    dst = tmp_path/'cols'
    shutil.copytree(ped_dir, dst)
    pd.read_csv(dst/'PSAX'/PED_TRACINGS).drop(columns=['Y']).to_csv(dst/'PSAX'/PED_TRACINGS, index=False)
    with pytest.raises(EchobookDataError, match=r"PSAX/VolumeTracings.csv: missing columns \['Y'\]"): scan_pediatric(dst)
    with pytest.raises(ValueError, match="unknown view 'PLAX'"): scan_pediatric(ped_dir, view='PLAX')


def test_inspect_without_opening_videos(ped_dir):
    report = inspect_pediatric(ped_dir, check_videos=False)
    json.dumps(report)
    assert report['videos'] == 12 and report['views']['A4C']['traced_frames_per_video'] == {2: 6}
    assert sum(report['views']['PSAX']['folds'].values()) == 6 and 25 <= report['views']['A4C']['ef']['median'] <= 80


def test_kind_detection_and_dispatch(ped_dir, tmp_path):
    from echobook.data.kinds import KINDS, detect_kind, inspect_data, format_inspection, prepare_data, write_phantom
    assert 'pediatric' in KINDS and detect_kind(ped_dir) == 'pediatric'
    (tmp_path/'psax-only').mkdir(); shutil.copytree(ped_dir/'PSAX', tmp_path/'psax-only'/'PSAX')
    assert detect_kind(tmp_path/'psax-only') == 'pediatric'
    (tmp_path/'no-filelist'/'A4C').mkdir(parents=True)
    with pytest.raises(EchobookDataError, match='cannot tell the dataset kind'): detect_kind(tmp_path/'no-filelist')
    assert write_phantom(tmp_path/'w', 'pediatric', videos=3, seed=1, progress=False) == '2 A4C and 1 PSAX phantom videos (EchoNet-Pediatric layout)'
    report = inspect_data(tmp_path/'w')
    assert report['kind'] == 'pediatric' and report['videos'] == 3 and 'EchoNet-Pediatric' in format_inspection(report)
    with pytest.raises(ValueError, match='not supported yet'): prepare_data(ped_dir, tmp_path/'cache')


def test_cli_phantom_and_inspect(ped_dir, tmp_path, capsys):
    "`echobook inspect` detects and reports an EchoNet-Pediatric folder; `echobook phantom OUT --kind pediatric` writes one."
    from echobook.cli import main
    assert main(['inspect', str(ped_dir)]) == 0
    out = capsys.readouterr().out
    assert 'EchoNet-Pediatric' in out and '12 usable videos' in out and 'PSAX: 6 usable' in out
    assert main(['inspect', str(ped_dir), '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['kind'] == 'pediatric' and report['views']['A4C']['videos'] == 6
    code = main(['phantom', str(tmp_path/'cli'), '--kind', 'pediatric', '--videos', '4'])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path/'cli').iterdir()) == list(PED_VIEWS)
    assert main(['inspect', str(tmp_path/'cli')]) == 0
    assert '4 usable videos' in capsys.readouterr().out
