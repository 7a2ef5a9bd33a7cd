"""EF (papers 001, 003): the CAMUS reader on fixtures written here, and the two experiment notebooks end to end (tiny)."""
import json, zlib
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

from echobook.data.echonet import EchobookDataError, scan_dataset, read_frames
from echobook.tasks.ef import (scan_camus, read_camus_info, read_camus_sequence, read_mhd, camus_clip, camus_clips, square_pad,
                         write_camus_like, find_ed_es, beats, phantom_areas, ef_metrics)

NBS = Path(__file__).parents[1]/'nbs'/'experiments'

# A CAMUS patient written by hand, as the releases lay it out (not with echobook's writer).
INFO_NEW = 'ED: 1\nES: 13\nNbFrame: 13\nSex: F\nAge: 53\nImageQuality: Good\nEF: 43\nFrameRate: 46.0\n'
INFO_OLD = 'ED: 2\nES: 11\nNbFrame: 15\nSex: M\nAge: 61\nImageQuality: Medium\nLVedv: 82.49\nLVesv: 52.38\nLVef: 36.50\n'


def _marked_sequence(t, h=80, w=60):
    "uint8 (T, H, W) frames with a bright mark at (row 10, col 45): tells transposed or mirrored reads apart."
    seq = np.zeros((t, h, w), np.uint8)
    seq[:, 8:13, 43:48] = 250
    seq[:, h // 2:, :] += np.arange(t, dtype=np.uint8)[:, None, None]  # frame number in the lower half
    return seq


def _write_nifti_patient(root, n=1):
    import nibabel as nib
    folder = root/'database_nifti'/f'patient{n:04d}'; folder.mkdir(parents=True)
    seq = _marked_sequence(13)
    for view in ('2CH', '4CH'):   # CAMUS NIfTI arrays are (W, H, T)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(seq.T), np.diag([0.31, 0.31, 1, 1])), str(folder/f'patient{n:04d}_{view}_half_sequence.nii.gz'))
        (folder/f'Info_{view}.cfg').write_text(INFO_NEW)
    return seq


def _write_mhd_patient(root, n=1, compressed=False):
    folder = root/'training'/f'patient{n:04d}'; folder.mkdir(parents=True)
    seq = _marked_sequence(15)
    stem = f'patient{n:04d}_4CH_sequence'
    raw = seq.tobytes()
    ext = 'zraw' if compressed else 'raw'
    (folder/f'{stem}.{ext}').write_bytes(zlib.compress(raw) if compressed else raw)
    (folder/f'{stem}.mhd').write_text(
        'ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n'
        f'CompressedData = {compressed}\nElementSpacing = 0.154 0.308 1\nDimSize = 60 80 15\n'
        f'ElementType = MET_UCHAR\nElementDataFile = {stem}.{ext}\n')
    (folder/'Info_4CH.cfg').write_text(INFO_OLD)
    return seq


def test_camus_nifti_layout(tmp_path):
    seq = _write_nifti_patient(tmp_path)
    recs, excl = scan_camus(tmp_path)
    assert len(excl) == 0 and list(recs.view) == ['2CH', '4CH']
    r = recs.iloc[1]
    assert (r.ed_frame, r.es_frame, r.n_frames, r.ef, r.fps, r.quality, r.sex, r.age) == (0, 12, 13, 43.0, 46.0, 'Good', 'F', 53)
    got = read_camus_sequence(r.path)
    np.testing.assert_array_equal(got, seq)                   # (T, H, W), probe at the top: the mark stays at (10, 45)
    assert got[0, 10, 45] == 250 and got[0, 45, 10] == 0
    clip = camus_clip(got, r.ed_frame, r.es_frame, n_frames=8, size=32)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    assert clip[0, 3:6, 21:24].max() > 100 and clip[0, 3:6, 8:11].max() < 20   # square-padded (10 px each side), resized
    assert camus_clips(recs, 8, 32, progress=False).shape == (2, 8, 32, 32, 3)


def test_camus_mhd_layout(tmp_path):
    seq = _write_mhd_patient(tmp_path, 1)
    seq2 = _write_mhd_patient(tmp_path, 2, compressed=True)
    recs, excl = scan_camus(tmp_path, views=('4CH',))
    assert len(recs) == 2 and len(excl) == 0 and (recs.format == 'mhd').all()
    r = recs.iloc[0]
    assert (r.ed_frame, r.es_frame, r.ef, r.edv, r.esv) == (1, 10, 36.5, 82.49, 52.38)
    np.testing.assert_array_equal(read_camus_sequence(r.path), seq)
    np.testing.assert_array_equal(read_mhd(recs.path[1]), seq2)


def test_camus_problems_are_named(tmp_path):
    _write_nifti_patient(tmp_path, 1)
    p2 = tmp_path/'database_nifti'/'patient0002'; p2.mkdir()
    (p2/'Info_4CH.cfg').write_text('ED: 1\nNbFrame: 10\nEF: 50\n')                    # ES missing, no sequence either
    (p2/'Info_2CH.cfg').write_text('ED: 4\nES: 4\nNbFrame: 10\nEF: 50\n')
    (p2/'patient0002_2CH_half_sequence.nii.gz').write_bytes(b'not a nifti')
    recs, excl = scan_camus(tmp_path)
    reasons = dict(zip(excl.view, excl.reason))
    assert len(recs) == 2 and reasons['4CH'] == 'no sequence file' and 'do not fit' in reasons['2CH']
    with pytest.raises(EchobookDataError, match='cannot read NIfTI'): read_camus_sequence(p2/'patient0002_2CH_half_sequence.nii.gz')
    with pytest.raises(EchobookDataError, match="missing \\['ES'\\]"): read_camus_info(p2/'Info_4CH.cfg')
    (p2/'Info_4CH.cfg').write_text('ED: one\nES: 3\n')
    with pytest.raises(EchobookDataError, match="cannot parse 'ED'"): read_camus_info(p2/'Info_4CH.cfg')
    with pytest.raises(EchobookDataError, match='no patientXXXX'): scan_camus(p2)


def test_camus_truncated_raw(tmp_path):
    _write_mhd_patient(tmp_path)
    raw = next((tmp_path/'training'/'patient0001').glob('*.raw'))
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(EchobookDataError, match='100 bytes, expected 72000'): read_mhd(raw.with_suffix('.mhd'))


@pytest.mark.parametrize('fmt', ['nifti', 'mhd'])
def test_camus_like_round_trip(phantom_dir, tmp_path, fmt):
    "A CAMUS-layout copy of phantom videos reads back with the right ED/ES, EF and orientation."
    out = write_camus_like(phantom_dir, tmp_path/'camus', n_patients=3, fmt=fmt, lead=2, seed=1)
    recs, excl = scan_camus(out)
    assert len(recs) == 6 and len(excl) == 0
    src = [r for r in scan_dataset(phantom_dir).records if r.ed_frame < r.es_frame][:3]
    for r4, s in zip(recs[recs.view == '4CH'].itertuples(), src):
        assert abs(r4.ef - s.ef_filelist) < 0.01
        seq = read_camus_sequence(r4.path)
        assert r4.es_frame - r4.ed_frame == s.es_frame - s.ed_frame and r4.es_frame == len(seq) - 1
        import cv2
        block = cv2.resize(seq[r4.ed_frame, 16:144], (112, 112), interpolation=cv2.INTER_AREA).astype(float)
        ed = read_frames(s.path, [s.ed_frame])[0].mean(-1)
        d = np.abs(block - ed).mean()
        assert d < 10 and d < 0.5 * np.abs(block[:, ::-1] - ed).mean() and d < 0.5 * np.abs(block.T - ed).mean()


def test_square_pad():
    a = np.ones((2, 4, 6), np.uint8)
    p = square_pad(a)
    assert p.shape == (2, 6, 6) and p[:, 1:5].all() and not p[:, 0].any() and not p[:, 5].any()


def test_peaks_on_true_areas(phantom_dir):
    "ED/ES found on the true area curves are within 2 frames of the phantom's true ED/ES (away from the video ends)."
    truth = pd.read_csv(phantom_dir/'PhantomTruth.csv')
    fps = pd.read_csv(phantom_dir/'FileList.csv').set_index('FileName').FPS
    areas = phantom_areas(phantom_dir)
    for name, g in truth.groupby('FileName'):
        ed, es = find_ed_es(areas[name], fps[name])
        true_ed, true_es = np.flatnonzero(g.IsED), np.flatnonzero(g.IsES)
        assert len(ed) and len(es) and len(beats(ed, es))
        assert np.abs(ed[:, None] - true_ed[None]).min(1).max() <= 2, name
        assert np.abs(es[:, None] - true_es[None]).min(1).max() <= 2, name


def _papermill(nb, out, **params):
    import papermill as pm
    pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name='echobook', progress_bar=False, cwd=str(out.parent))


@pytest.mark.slow   # ~25 s of CPU; about a minute of wall time on 2 busy cores
def test_ef_echoapex_notebook(phantom_dir, tmp_path):
    "The EchoApex-ST experiment end to end with tiny settings: run folder, metrics, predictions, figures."
    camus = write_camus_like(phantom_dir, tmp_path/'camus', n_patients=4)
    run = tmp_path/'run'
    _papermill(NBS/'ef_echoapex.ipynb', tmp_path/'out.ipynb', data_dir=str(phantom_dir), run_dir=str(run), seg_epochs=2,
               epochs=3, ood_data_dir=str(camus), ood_views='2CH,4CH', n_boot=50)
    assert json.loads((run/'status.json').read_text())['state'] == 'done'
    m = json.loads((run/'metrics.json').read_text())
    s = m['summary']
    for k in ('model', 'clip', 'mean', 'model_tracings', 'ood', 'ood_mean'):
        assert np.isfinite(s[f'{k}/mae/mean']) and s[f'{k}/mae/ci_lo'] <= s[f'{k}/mae/mean'] <= s[f'{k}/mae/ci_hi']
    assert m['n_ood'] == 8 and 'model/ood_mae/mean' in s
    pred = pd.read_csv(run/'predictions.csv')
    assert len(pred) == m['n_test'] and {'ef_pred', 'ef_clip', 'ef_filelist', 'ef_tracings', 'n_beats'} <= set(pred.columns)
    assert (pred.n_beats >= 1).all()
    assert {'area_curve.png', 'test_scatter_roc.png', 'ood_scatter_roc.png', 'loss.png'} <= {p.name for p in (run/'figures').iterdir()}
    assert (run/'embeddings'/'meta.json').exists() and (run/'decoder.pth').exists() and (run/'segmenter.pth').exists()


def test_ef_videomae_notebook(phantom_dir, tmp_path):
    "The video-transformer experiment end to end with tiny settings (pretraining and fine-tuning one epoch each)."
    run = tmp_path/'run'
    _papermill(NBS/'ef_videomae.ipynb', tmp_path/'out.ipynb', data_dir=str(phantom_dir), run_dir=str(run),
               cache_dir=str(tmp_path/'grey'), size=32, frames=8, period=4, patch=8, dim=32, depth=1, heads=2,
               pretrain_epochs=1, finetune_epochs=1, batch_size=4, test_clips=2, n_boot=50)
    m = json.loads((run/'metrics.json').read_text())
    assert json.loads((run/'status.json').read_text())['state'] == 'done'
    assert np.isfinite(m['summary']['model/mae/mean']) and m['pretrain_final_loss'] > 0
    assert {'mae_reconstruction.png', 'test_scatter_roc.png'} <= {p.name for p in (run/'figures').iterdir()}
    assert len(pd.read_csv(run/'predictions.csv')) == m['n_test']


def test_cli_camus(tmp_path, capsys):
    from echobook.cli import main
    _write_nifti_patient(tmp_path)
    assert main(['camus', str(tmp_path)]) == 0
    assert '1 patients, 2 views' in capsys.readouterr().out
    assert main(['camus', str(tmp_path/'nowhere')]) == 2
