"""EF (papers 001, 003): the CAMUS reader on fixtures written here; NaN EF excluded with a reason and model and baseline
scored on the same videos; caches that know their data; every EF fit through the one trainer; plots outside a notebook;
the two experiment notebooks end to end (tiny), where the EF model beats the training mean."""
import json, os, shutil, subprocess, sys, zlib
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from echobook.core import EchobookDataError, ResumeError
from echobook.data.echonet import EF_POLICY, scan_dataset, read_frames, read_video
from echobook.data.camus import (scan_camus, read_camus_info, read_camus_sequence, read_mhd, camus_clip, camus_clips, square_pad,
                                 write_camus_like, ensure_camus_like, inspect_camus, format_camus)
from echobook.models.segmenters import build_segmenter, load_segmenter
from echobook.core import module_hash
from echobook.models.video import EFDecoder, ViViT, SegmenterEncoder, cache_grey_videos
from echobook.training import EncoderHead
from echobook.tasks.ef import (ef_table, ef_splits, ef_targets, ef_metrics, ef_metrics_ci, ef_per_video, ef_summary, train_ef_decoder,
                               two_stage_ef, evaluate_echoapex, ef_embeddings, find_ed_es, beats, phantom_areas)

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



def test_inspect_camus(tmp_path):
    "What `echobook inspect` prints for a CAMUS folder (the CLI calls `inspect_camus` and `format_camus`)."
    _write_nifti_patient(tmp_path)
    info = inspect_camus(tmp_path)
    assert (info['patients'], info['views'], info['excluded']) == (1, {'2CH': 1, '4CH': 1}, [])
    assert '1 patients, 2 views' in format_camus(info) and 'EF: median 43.0 %' in format_camus(info)
    json.dumps(info)
    with pytest.raises(EchobookDataError, match='CAMUS folder not found'): inspect_camus(tmp_path/'nowhere')


def test_camus_like_copy_follows_its_source(phantom_dir, tmp_path):
    "A CAMUS-like copy is rewritten when its source dataset changes (data identity), reused otherwise."
    src = tmp_path/'src'; shutil.copytree(phantom_dir, src)
    out = ensure_camus_like(src, tmp_path/'camus', n_patients=2)
    first = (out/'source.json').read_text()
    assert ensure_camus_like(src, out, n_patients=2) == out and (out/'source.json').read_text() == first
    fl = pd.read_csv(src/'FileList.csv')
    name = scan_camus(out)[0].iloc[0]
    fl.loc[fl.EF.notna(), 'EF'] = fl.EF.clip(upper=90) - 1.0        # the file list is edited: every EF changes by 1 %
    fl.to_csv(src/'FileList.csv', index=False)
    new = scan_camus(ensure_camus_like(src, out, n_patients=2))[0]
    assert (out/'source.json').read_text() != first and abs(new.ef.iloc[0] - name.ef) > 0.5


# ---- NaN EF: excluded with a reason, never a target, model and mean scored on the same videos ----

@pytest.fixture(scope='module')
def nan_copy(phantom_dir, tmp_path_factory):
    "The phantom with one TRAIN video's FileList EF blanked and one TEST video's EF set to 120 %."
    d = tmp_path_factory.mktemp('nan')/'data'
    shutil.copytree(phantom_dir, d)
    fl = pd.read_csv(d/'FileList.csv')
    bad = {fl.FileName[fl.Split == 'TRAIN'].iloc[0]: np.nan, fl.FileName[fl.Split == 'TEST'].iloc[0]: 120.0}
    fl['EF'] = [bad.get(n, e) for n, e in zip(fl.FileName, fl.EF)]
    fl.to_csv(d/'FileList.csv', index=False)
    return d, bad


def test_nan_ef_is_excluded_with_a_reason(nan_copy):
    d, bad = nan_copy
    table = ef_table(scan_dataset(d))
    ex = table[table.excluded].set_index('FileName').reason
    assert set(ex.index) == set(bad)
    assert ex[[n for n, v in bad.items() if np.isnan(v)][0]] == 'FileList EF is not a number (nan)'
    assert ex[[n for n, v in bad.items() if v == 120][0]] == 'FileList EF 120 is not a percentage'
    split = ef_splits(table)
    assert not set(bad) & set(pd.concat(split.values()).FileName) and sum(map(len, split.values())) == len(table) - 2
    assert np.isfinite(ef_targets(split['TRAIN'])).all()
    with pytest.raises(ValueError, match='not finite'): ef_targets(table[table.Split == 'TRAIN'])


def test_nan_never_reaches_the_decoder_bias():
    for bad in (float('nan'), float('inf'), 0.0, 100.0):
        with pytest.raises(ValueError, match='finite EF'): EFDecoder(16, ef_init=bad)
        with pytest.raises(ValueError, match='finite EF'): ViViT(img_size=32, frames=4, patch=8, dim=16, depth=1, heads=1, ef_init=bad)
    z = np.random.default_rng(0).normal(size=(6, 8, 16)).astype(np.float32)
    with pytest.raises(ValueError, match='not finite'):
        train_ef_decoder(z, [50, 60, np.nan, 40, 55, 45], z[:2], [50, 50], 'unused', {}, dim=16, epochs=1)


def test_model_and_mean_scored_on_the_same_videos():
    true = np.array([30., 45, 55, 60, 65, 70, 40, 50])
    pred = np.array([35., 44, np.nan, 58, 66, 69, 42, 49])
    per = ef_per_video(pd.DataFrame(dict(FileName=list('abcdefgh'), ef_filelist=true, ef_tracings=true + 1)),
                       dict(model=pred), train_mean=55.0, reasons=[''] * 6 + ['no beat found and a flat area curve', ''])
    assert per.excluded.tolist() == [False, False, True, False, False, False, True, False]
    assert per.reason[2] == 'ef_model is not finite' and per.reason[6] == 'no beat found and a flat area curve'
    s, table = ef_summary(per, n_boot=50)
    keep = ~per.excluded.to_numpy()
    assert (s['n_scored'], s['n_excluded']) == (6, 2) and s['model/n'] == s['mean/n'] == s['model_tracings/n'] == 6
    assert s['mean/mae/mean'] == pytest.approx(np.abs(55 - true[keep]).mean())
    assert s['model/mae/mean'] == pytest.approx(np.abs(pred[keep] - true[keep]).mean())
    with pytest.raises(ValueError, match='not finite'): ef_metrics(pred, true)        # never silently dropped
    with pytest.raises(ValueError, match='not finite'): ef_metrics_ci(pred, true, n_boot=10)


class _MeanBrightness(nn.Module):
    "A stand-in EF model: per-frame mean brightness as features, a linear decoder (EF = 100·sigmoid)."
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
    def embed_frames(self, x): return x.float().mean((1, 3, 4))[..., None]
    def forward(self, z): return 100 * torch.sigmoid(self.lin(z.mean(1))[:, 0] / 50)


def test_two_stage_fallback_is_excluded_and_counted(phantom_dir):
    "A video without any beat and with a flat area curve gets no EF: kept as excluded with its reason, counted, not scored."
    table = ef_table(scan_dataset(phantom_dir))
    test = ef_splits(table)['TEST']
    m = _MeanBrightness()
    model = EncoderHead(SegmenterEncoderLike(m), m)
    truth, flat = phantom_areas(phantom_dir), test.FileName[0]
    area_fn = lambda name, video: np.ones(len(video)) if name == flat else truth[name]
    two = two_stage_ef(test, model, area_fn, n_frames=4, size=32, progress=False)
    assert np.isnan(two.ef_pred[0]) and two.reason[0] == 'no beat found and a flat area curve' and (two.reason[1:] == '').all()
    z = np.zeros((len(test), 4, 1), np.float32)
    per = evaluate_echoapex(model, test, z, area_fn, 50.0, n_frames=4, size=32, progress=False)
    assert len(per) == len(test) and per.excluded.tolist() == [True] + [False] * (len(test) - 1)
    s, _ = ef_summary(per, n_boot=20)
    assert (s['n_scored'], s['n_excluded']) == (len(test) - 1, 1) and s['clip/n'] == s['mean/n'] == len(test) - 1


def test_test_videos_without_tracings_are_scored(phantom_dir, tmp_path):
    "EF policy: a TEST video without tracings is scored by the two-stage model and the mean; `clip` and the tracings' EF skip it."
    d = tmp_path/'data'; shutil.copytree(phantom_dir, d)
    fl, tr = pd.read_csv(d/'FileList.csv'), pd.read_csv(d/'VolumeTracings.csv')
    gone = fl.FileName[fl.Split == 'TEST'].iloc[0]
    tr[tr.FileName != gone + '.avi'].to_csv(d/'VolumeTracings.csv', index=False)
    table = ef_table(scan_dataset(d, policy=EF_POLICY))
    test, traced = ef_splits(table)['TEST'], ef_splits(table, traced=True)['TEST']
    assert len(test) == (fl.Split == 'TEST').sum() == len(traced) + 1 and not test.set_index('FileName').traced[gone]
    m = _MeanBrightness()
    truth = phantom_areas(d)
    per = evaluate_echoapex(EncoderHead(SegmenterEncoderLike(m), m), test, np.zeros((len(traced), 4, 1), np.float32),
                            lambda name, video: truth[name], 50.0, n_frames=4, size=32, progress=False)
    row = per.set_index('FileName').loc[gone]
    assert not row.excluded and np.isfinite(row.ef_model) and np.isnan(row.ef_clip) and np.isnan(row.ef_tracings) and np.isnan(row.ed_error)
    s, _ = ef_summary(per, n_boot=20)
    assert s['n_scored'] == s['model/n'] == s['mean/n'] == len(test) and s['clip/n'] == s['model_tracings/n'] == s['mean_tracings/n'] == len(traced)
    with pytest.raises(ValueError, match='clip embeddings for'):
        evaluate_echoapex(EncoderHead(SegmenterEncoderLike(m), m), test, np.zeros((len(test), 4, 1), np.float32),
                          lambda name, video: truth[name], 50.0, n_frames=4, size=32, progress=False)


class SegmenterEncoderLike(nn.Module):
    "`FrameFeatures`-style wrapper for the stand-in model (its `embed_frames` without gradients)."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x):
        with torch.no_grad(): return self.m.embed_frames(x)


# ---- caches that know their data ----

def test_embeddings_of_a_retrained_segmenter_are_not_reused(phantom_dir, tmp_path):
    "The embedding key holds the segmenter's weights: another segmenter → another cache entry and other embeddings."
    table = ef_table(scan_dataset(phantom_dir))
    rows = table[~table.excluded].head(4).reset_index(drop=True)
    embed = lambda seg: ef_embeddings(rows, SegmenterEncoder(seg), tmp_path, n_frames=4, size=32, name='segmenter-32',
                                      model_hash=module_hash(seg), progress=False)
    segs = [build_segmenter('unet', size=32, channels=(4, 8, 16, 32), res_units=1, seed=s) for s in (0, 0, 1)]
    z0 = embed(segs[0])
    entries = lambda: sorted(p.name for p in (tmp_path/'embeddings').iterdir() if p.is_dir())
    one = entries()
    np.testing.assert_array_equal(embed(segs[1]), z0)          # the same weights: read from the cache
    assert entries() == one
    z2 = embed(segs[2])                                        # "retrained": new weights, new key, recomputed
    assert len(entries()) == 2 and np.abs(z2 - z0).max() > 1e-3
    meta = json.loads((tmp_path/'embeddings'/one[0]/'meta.json').read_text())
    assert meta['weights'] == f'model:{module_hash(segs[0])}' and meta['encoder'] == 'segmenter-32'


def test_edited_video_is_decoded_again(phantom_dir, tmp_path):
    "The grey video cache re-decodes a video whose file changed (size or modification time)."
    d = tmp_path/'data'; shutil.copytree(phantom_dir, d)
    table = ef_table(scan_dataset(d)).head(3)
    cache = cache_grey_videos(table, tmp_path/'grey', size=32, progress=False)
    a, b = Path(table.path[0]), Path(table.path[1])
    before = np.load(cache/f'{table.FileName[0]}.npy')
    shutil.copyfile(b, a)                                       # video 0 now holds video 1's frames
    cache_grey_videos(table, cache, size=32, progress=False)
    np.testing.assert_array_equal(np.load(cache/f'{table.FileName[0]}.npy'), np.load(cache/f'{table.FileName[1]}.npy'))
    assert not np.array_equal(before, np.load(cache/f'{table.FileName[0]}.npy'))


# ---- every EF fit through the one trainer: checkpoints, resume, refusal of another config ----

def test_decoder_fit_checkpoints_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(24, 8, 16)).astype(np.float32)
    y = (50 + 10 * z[:, :, 0].mean(1)).astype(np.float32)
    args = (z[:16], y[:16], z[16:], y[16:], tmp_path/'decoder')
    _, log = train_ef_decoder(*args, dict(run=1), dim=16, epochs=2, batch_size=8)
    assert len(log) == 2 and {'checkpoint.pth', 'best.pth', 'log.csv'} <= {p.name for p in (tmp_path/'decoder').iterdir()}
    _, log = train_ef_decoder(*args, dict(run=1), dim=16, epochs=4, batch_size=8)     # an interrupted longer fit resumes at epoch 2
    assert log.epoch.tolist() == [0, 1, 2, 3]
    with pytest.raises(ResumeError, match='another config'): train_ef_decoder(*args, dict(run=2), dim=16, epochs=4, batch_size=8)


def test_cosine_schedule_resumes_where_it_stopped(tmp_path):
    "A fit with the cosine schedule killed after epoch 2 (a cluster's time limit) resumes to the same log and weights."
    from fastai.callback.core import Callback
    from echobook.training import fit, read_log
    from echobook.tasks.ef import ef_mse
    class Kill(Callback):
        order = 90
        def after_epoch(self):
            if self.epoch == 1: raise KeyboardInterrupt('time limit')
    rng = np.random.default_rng(0)
    z = torch.as_tensor(rng.normal(size=(24, 4, 8)), dtype=torch.float32)
    ds = torch.utils.data.TensorDataset(z, 50 + 10 * z[:, :, 0].mean(1))
    def run(folder, cbs=()):
        torch.manual_seed(0)
        dec = EFDecoder(8, 4, dim=8, ef_init=50.)
        fit(dec, ds, ds, folder, config=dict(a=1), epochs=4, loss_func=ef_mse, lr=1e-3, batch_size=8, opt='adamw', progress=False,
            schedule='cosine', cbs=list(cbs))
        return dec, read_log(folder)
    full, log_full = run(tmp_path/'full')
    with pytest.raises(KeyboardInterrupt): run(tmp_path/'cut', [Kill()])
    assert len(read_log(tmp_path/'cut')) == 2
    resumed, log = run(tmp_path/'cut')
    np.testing.assert_allclose(log.lr, log_full.lr, rtol=1e-6)            # the schedule continues, it does not restart
    assert log.lr.iloc[-1] < log.lr.iloc[0] / 5
    np.testing.assert_allclose(log.valid_loss, log_full.valid_loss, rtol=1e-4)
    for k, v in full.state_dict().items(): torch.testing.assert_close(resumed.state_dict()[k], v)


# ---- plots work outside a notebook (no `plt` in scope) ----

def test_plots_outside_a_notebook(tmp_path):
    code = f"""
import numpy as np, pandas as pd, torch
import echobook.tasks.ef as ef
from echobook.models.video import ViViT, VideoMAE, show_reconstruction
t = np.linspace(20, 75, 30); p = t + np.random.default_rng(0).normal(0, 5, 30)
ax = ef.plot_ef_scatter(p, t); ax.figure.savefig({str(tmp_path/'a.png')!r})
ef.plot_roc(p, t); ef.plot_area_curve(np.sin(np.linspace(0, 20, 200)) + 2, 50, 10, 20)
per = ef.ef_per_video(pd.DataFrame(dict(FileName=[str(i) for i in range(30)], ef_filelist=t, ef_tracings=t)), dict(model=p), 50.)
ef.plot_ef_results(per, {{'model': 'ef_model'}}, train_mean=50.).savefig({str(tmp_path/'b.png')!r})
mae = VideoMAE(ViViT(img_size=32, frames=4, patch=8, dim=16, depth=1, heads=1), decoder_dim=8, decoder_depth=1, decoder_heads=1)
show_reconstruction(mae, torch.randint(0, 255, (1, 1, 4, 32, 32)))
print('ok')
"""
    env = {**os.environ, 'MPLBACKEND': 'Agg'}
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-2000:]
    assert (tmp_path/'a.png').stat().st_size > 0 and (tmp_path/'b.png').stat().st_size > 0


# ---- the experiment notebooks end to end (tiny) ----

def _papermill(nb, out, **params):
    import papermill as pm
    pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name='echobook', progress_bar=False, cwd=str(out.parent))


@pytest.fixture(scope='module')
def phantom160(tmp_path_factory):
    "The tiny profile's data: the 160-video phantom (seed 0) that `ensure_phantom` writes for the experiment notebooks."
    from echobook.data.phantom import make_phantom
    return make_phantom(tmp_path_factory.mktemp('p160')/'data', n_videos=160, seed=0, progress=False)


@pytest.mark.slow   # about 2.5 min on 2 cores (1 min of it writing the phantom)
@pytest.mark.learning   # a tiny-profile result (minutes): `make test-learning`, not `make test`
def test_ef_echoapex_tiny_profile_beats_the_training_mean(phantom160, tmp_path):
    "EchoApex-ST end to end, tiny profile: run folder, checkpoints, keyed embeddings, and EF better than the training mean."
    camus = write_camus_like(phantom160, tmp_path/'camus', n_patients=4)
    run, cache = tmp_path/'run', tmp_path/'cache'
    _papermill(NBS/'ef_echoapex.ipynb', tmp_path/'out.ipynb', data_dir=str(phantom160), run_dir=str(run), cache_dir=str(cache),
               epochs='100', ood_data_dir=str(camus), ood_views='2CH,4CH', n_boot=50)   # a string, as `papermill -p` passes it
    assert json.loads((run/'status.json').read_text())['state'] == 'done'
    m = json.loads((run/'metrics.json').read_text())
    s = m['summary']
    for k in ('model', 'clip', 'mean', 'model_tracings', 'ood', 'ood_mean'):
        assert np.isfinite(s[f'{k}/mae/mean']) and s[f'{k}/mae/ci_lo'] <= s[f'{k}/mae/mean'] <= s[f'{k}/mae/ci_hi']
    # measured (2 CPU threads): two-stage 6.25, traced clip 6.67, training mean 9.86 MAE on the 20 test videos
    assert s['model/mae/mean'] < s['mean/mae/mean'] - 1 and s['clip/mae/mean'] < s['mean/mae/mean'] - 1, 'EF must beat the training mean'
    assert m['n_scored'] + m['n_excluded'] == m['n_test'] and s['model/n'] == s['mean/n'] == m['n_scored']
    assert m['n_ood'] == 8 and 'model/ood_mae/mean' in s and m['epochs_run'] == 100
    per = pd.read_csv(run/'per_video.csv')
    assert len(per) == m['n_test'] and {'ef_model', 'ef_clip', 'ef_mean', 'ef_filelist', 'ef_tracings', 'excluded', 'reason', 'n_beats'} <= set(per.columns)
    assert {'area_curve.png', 'test_scatter_roc.png', 'ood_scatter_roc.png', 'loss.png'} <= {p.name for p in (run/'figures').iterdir()}
    for fit in ('segmenter', 'decoder'): assert {'checkpoint.pth', 'best.pth', 'log.csv'} <= {p.name for p in (run/fit).iterdir()}
    seg = build_segmenter('unet', size=64, channels=(8, 16, 32, 64), res_units=1)
    seg.load_state_dict(torch.load(run/'segmenter'/'best.pth', map_location='cpu'))
    metas = [json.loads(p.read_text()) for p in (cache/'embeddings').glob('*/meta.json')]
    assert [x['weights'] for x in metas] == [f'model:{module_hash(seg)}'], 'embeddings are keyed by the trained segmenter'
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['epochs'] == 100 and cfg['pretrained'] is False and cfg['profile'] == 'tiny'


@pytest.mark.slow   # about 3 min on 2 busy cores (plus the phantom)
@pytest.mark.learning
@pytest.mark.parametrize('pretrain', [True, False])
def test_ef_videomae_tiny_profile_is_below_the_training_mean(phantom160, tmp_path, pretrain):
    "The ViViT, tiny profile, with and without masked-autoencoder pretraining: a lower MAE than the training mean (a pipeline check)."
    run = tmp_path/'run'
    _papermill(NBS/'ef_videomae.ipynb', tmp_path/'out.ipynb', data_dir=str(phantom160), run_dir=str(run), cache_dir=str(tmp_path/'grey'),
               pretrain=pretrain, n_boot=200)
    m = json.loads((run/'metrics.json').read_text())
    s = m['summary']
    # measured (issue 17, seed 0): MAE-pretrained 9.06 (paired Wilcoxon p 0.090), from scratch 9.28 (p 0.083), training mean
    # 9.86 on the 20 test videos; the old tiny profile: 9.65 (p 0.23). Not significant: the table caption says so.
    assert s['model/mae/mean'] < s['mean/mae/mean'] - 0.3 and s['model/vs_mean/p_wilcoxon'] < 0.2, 'the ViViT must do better than the training mean'
    assert m['n_scored'] == m['n_test'] == 20 and json.loads((run/'config.json').read_text())['profile'] == 'tiny'


def test_ef_videomae_notebook(phantom_dir, tmp_path):
    "The video-transformer experiment end to end with tiny settings (pretraining and fine-tuning one epoch each)."
    run = tmp_path/'run'
    _papermill(NBS/'ef_videomae.ipynb', tmp_path/'out.ipynb', data_dir=str(phantom_dir), run_dir=str(run),
               cache_dir=str(tmp_path/'grey'), size=32, frames=8, period=4, patch=8, dim=32, depth=1, heads=2,
               pretrain_epochs=1, finetune_epochs=1, batch_size=4, test_clips=2, n_boot=50, pretrain='false')
    m = json.loads((run/'metrics.json').read_text())
    assert json.loads((run/'status.json').read_text())['state'] == 'done'
    assert np.isfinite(m['summary']['model/mae/mean']) and m['pretrain_final_loss'] is None   # 'false' is False: no pretraining
    assert not (run/'pretrain').exists() and (run/'finetune'/'checkpoint.pth').exists()
    assert len(pd.read_csv(run/'per_video.csv')) == m['n_test'] == m['n_scored'] + m['n_excluded']


def _ef_only_copy(src, dst, state):
    "`src` as an EF-only folder: FileList.csv and Videos/ only, VolumeTracings.csv absent or with a header and no rows."
    dst.mkdir(parents=True)
    shutil.copy(src/'FileList.csv', dst/'FileList.csv'); shutil.copytree(src/'Videos', dst/'Videos')
    if state == 'header only': (dst/'VolumeTracings.csv').write_text('FileName,X1,Y1,X2,Y2,Frame\n')
    return dst


@pytest.mark.parametrize('state', ['missing', 'header only'])
def test_ef_videomae_runs_on_an_ef_only_folder(phantom_dir, tmp_path, state):
    "No tracings (file absent or empty): the ViViT experiment (FileList target) runs end to end and scores every TEST video."
    data, run = _ef_only_copy(phantom_dir, tmp_path/'data', state), tmp_path/'run'
    _papermill(NBS/'ef_videomae.ipynb', tmp_path/'out.ipynb', data_dir=str(data), run_dir=str(run), cache_dir=str(tmp_path/'grey'),
               size=16, frames=4, period=8, patch=8, tubelet=2, dim=8, depth=1, heads=1, pretrain_epochs=1, finetune_epochs=1,
               batch_size=8, test_clips=1, n_boot=20)
    m = json.loads((run/'metrics.json').read_text())
    n_test = (pd.read_csv(data/'FileList.csv').Split == 'TEST').sum()
    assert m['ef_only'] and m['n_test'] == m['n_scored'] == n_test and m['n_test_traced'] == 0 and m['n_excluded_ef'] == 0
    assert np.isfinite(m['summary']['model/mae/mean']) and m['summary']['model_tracings/n'] == 0
    assert (run/'pretrain'/'checkpoint.pth').exists()


def test_ef_notebooks_that_need_tracings_name_the_missing_file(phantom_dir, tmp_path):
    "ef_echoapex (stage-1 segmenter, traced training clips) and ef_videomae with target=tracings stop on an EF-only folder."
    import papermill as pm
    data = _ef_only_copy(phantom_dir, tmp_path/'data', 'missing')
    for nb, extra in (('ef_echoapex.ipynb', {}), ('ef_videomae.ipynb', dict(target='tracings'))):
        with pytest.raises(pm.PapermillExecutionError, match='VolumeTracings.csv: file not found: .*needs the volume tracings'):
            _papermill(NBS/nb, tmp_path/'out.ipynb', data_dir=str(data), run_dir=str(tmp_path/'run'), **extra)
    assert not (tmp_path/'run').exists()


def test_ef_notebooks_refuse_the_paper_profile_without_data(tmp_path):
    "The paper profile needs real data: the notebook stops at the parameter check, before any work."
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match='needs the real data'):
        _papermill(NBS/'ef_videomae.ipynb', tmp_path/'out.ipynb', profile='paper', run_dir=str(tmp_path/'run'))
    assert not (tmp_path/'run').exists()
