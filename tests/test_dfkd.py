"""EchoDFKD (paper 004): aFD on constructed curves, the student family, the segmenter checkpoint loader, the teacher-targets
cache's data identity, the CLIP evaluator, the table configs, and (slow) the experiment notebook end to end: the student
beats its untrained initialisation, the teacher is shared, `overwrite=True` retrains under the new config."""
import json
from pathlib import Path

import numpy as np
import pytest
from echobook.core import module_hash
import torch

from echobook.tasks import dfkd, dfkd_eval
from echobook.tasks.dfkd import ConvLSTMUNet, build_student
from echobook.tasks.dfkd_eval import afd_frame, contiguous_blocks
from echobook.models import segmenters

torch.set_num_threads(1)
NB = Path(__file__).parents[1]/'nbs'/'experiments'/'dfkd.ipynb'


# ---- aFD: constructed area curves with known answers ------------------------------------------------------------

def beats(n=161, period=40, phase=0):
    "A volume-like curve: ED (max) at phase + k·period, ES (min) half a period later."
    return np.cos(2*np.pi*(np.arange(n) - phase)/period)

@pytest.mark.parametrize('ref,es', [(3, 20), (18, 20), (41, 60), (57, 60), (99, 100), (140, 140), (160, 140)])
def test_afd_es_follows_the_reference_beat(ref, es):
    assert afd_frame(beats(), ref, 'ES') == es

@pytest.mark.parametrize('ref,ed', [(0, 0), (5, 0), (33, 40), (81, 80), (118, 120), (157, 160)])
def test_afd_ed_follows_the_reference_beat(ref, ed):
    assert afd_frame(beats(), ref, 'ED') == ed

def test_afd_irregular_beats_and_phase_shift():
    # beats of different lengths (30, 50, 40 frames): minima placed by hand
    c = np.concatenate([np.cos(2*np.pi*np.arange(p)/p) for p in (30, 50, 40)])
    assert [afd_frame(c, r, 'ES') for r in (14, 56, 98)] == [15, 55, 100]
    assert [afd_frame(c, r, 'ED') for r in (29, 82)] == [30, 80]
    assert afd_frame(beats(phase=7), 30, 'ES') == 27

def test_afd_invariant_to_offset_and_scale():
    for ref in (10, 57, 130):
        assert afd_frame(beats(), ref) == afd_frame(5 + 100*beats(), ref) == afd_frame(0.01*beats(), ref)

def test_afd_flat_and_plateau_curves():
    assert afd_frame(np.zeros(30), 12, 'ES') == 0 and afd_frame(np.full(30, 7.), 29, 'ED') == 0
    step = np.r_[np.ones(10), np.zeros(10), np.ones(10)]
    assert afd_frame(step, 15, 'ES') == 10 and afd_frame(step, 25, 'ED') == 20

def test_afd_short_clips():
    assert afd_frame([1.], 0, 'ES') == 0 and afd_frame([1.], 0, 'ED') == 0
    assert afd_frame([2., 1.], 0, 'ES') == 1 and afd_frame([2., 1.], 1, 'ED') == 0
    assert afd_frame([3., 1., 2.], 2, 'ES') == 1 and afd_frame([1., 3., 2.], 0, 'ED') == 1

def test_afd_noise_stays_near_the_true_extremum():
    rng = np.random.default_rng(0)
    err = [abs(afd_frame(beats() + 0.05*rng.standard_normal(161), 57) - 60) for _ in range(100)]
    assert np.mean(err) < 1.5 and max(err) <= 4

def test_afd_block_choice():
    assert contiguous_blocks([1, 1, 0, 1, 0, 0, 1]) == [(0, 1), (3, 3), (6, 6)]
    long_dip = np.r_[np.full(5, 2.), -np.linspace(1, 2, 30), np.full(3, 2.), -3, np.full(10, 2.)]
    assert afd_frame(long_dip, 20) == 34       # the block containing the reference, though a short one has a nearer end
    assert afd_frame(long_dip, 37) == 38
    assert afd_frame(beats(), 40, 'ES') == 20  # equidistant blocks: the earlier one

def test_afd_rejects_bad_input():
    for bad, match in [([], 'non-empty'), ([1., np.nan], 'NaN'), (np.ones((3, 3)), '1-d')]:
        with pytest.raises(ValueError, match=match): afd_frame(bad, 0)
    with pytest.raises(ValueError, match='phase'): afd_frame([1., 2.], 0, 'EF')

def test_afd_table_counts_every_video(phantom_dir):
    from echobook.data.echonet import scan_dataset
    recs = scan_dataset(phantom_dir).split('TEST')
    truth = dfkd_eval.truth_areas(phantom_dir)
    t = dfkd_eval.afd_table(truth, recs)
    assert len(t) == len(recs) and t.afd_es.max() <= 1 and t.afd_ed.max() <= 2   # the true area: the method's floor
    with pytest.raises(ValueError, match='no curve'): dfkd_eval.afd_table({}, recs)
    assert len(dfkd_eval.afd_from_csv(phantom_dir, phantom_dir/'PhantomTruth.csv')) == len(recs)


# ---- student family, segmenter checkpoint -------------------------------------------------------------------------

# The released student, transcribed independently from models.py of github.com/GregoirePetit/ConvLSTM-Segmentation
# (the ConvLSTM_Segmentation submodule of EchoDFKD): one 3×3 conv over [x_t, h_{t-1}] → 4h gates (i, f, o, g) per
# ConvLSTM layer, BatchNorm after each layer, 2×2 max-pool after every block but the last; decoder levels of
# Upsample(×2) → Conv 3×3 (2h → h) → BatchNorm, no skips, no ReLU; a 1×1 conv to one logit.
class _RefLSTM(torch.nn.Module):
    def __init__(self, c, h):
        super().__init__(); self.h, self.conv = h, torch.nn.Conv2d(c + h, 4*h, 3, padding=1)
    def forward(self, x):
        b, t, _, hh, ww = x.shape
        h = c = x.new_zeros(b, self.h, hh, ww); out = []
        for i in range(t):
            gi, gf, go, gg = torch.split(self.conv(torch.cat([x[:, i], h], 1)), self.h, 1)
            c = torch.sigmoid(gf)*c + torch.sigmoid(gi)*torch.tanh(gg); h = torch.sigmoid(go)*torch.tanh(c); out.append(h)
        return torch.stack(out, 1)

def _td(m, x):
    y = m(x.reshape(-1, *x.shape[2:])); return y.reshape(*x.shape[:2], *y.shape[1:])

class _RefModel(torch.nn.Module):
    def __init__(self, blocks, layers, f=12):
        super().__init__()
        self.blocks, self.layers, c = blocks, layers, 1
        self.lstm, self.bn = torch.nn.ModuleList(), torch.nn.ModuleList()
        for i in range(blocks):
            for j in range(layers):
                self.lstm.append(_RefLSTM(c, f*2**i)); self.bn.append(torch.nn.BatchNorm2d(f*2**i)); c = f*2**i
        self.up = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(2*f*2**i, f*2**i, 3, padding=1),
                                                          torch.nn.BatchNorm2d(f*2**i)) for i in range(blocks - 2, -1, -1))
        self.out = torch.nn.Conv2d(f, 1, 1)
    def forward(self, x):
        for i in range(self.blocks):
            for k in range(i*self.layers, (i + 1)*self.layers): x = _td(self.bn[k], self.lstm[k](x))
            if i < self.blocks - 1: x = _td(torch.nn.MaxPool2d(2), x)
        for u in self.up: x = _td(u, x)
        return _td(self.out, x)

def _load_reference(ours, ref):
    "Copy the reference weights into our student (its gate conv split into the input and recurrent halves)."
    for a, b in zip(ours.lstm, ref.lstm):
        c = a.wx.in_channels
        a.wx.weight.data, a.wx.bias.data, a.wh.weight.data = b.conv.weight[:, :c].clone(), b.conv.bias.clone(), b.conv.weight[:, c:].clone()
    for a, b in list(zip(ours.norm, ref.bn)) + [(u[1], r[2]) for u, r in zip(ours.up, ref.up)]: a.load_state_dict(b.state_dict())
    for u, r in zip(ours.up, ref.up): u[0].load_state_dict(r[1].state_dict())
    ours.head.load_state_dict(ref.out.state_dict())

PAPER_PARAMS = 0.72e6   # paper 004, Table 2: EchoDFKD (the best student; (B, l) = (4, 1) is the only one of that size)

def test_student_params_match_the_reference_for_every_b_l():
    t = dfkd.student_complexity(sizes=(56,)).set_index(['B', 'l'])   # the defaults: reference + last-block residual
    assert len(t) == 16 and (t.params < 4e6).all()
    for b in range(1, 5):
        for l in range(1, 5):
            with torch.device('meta'): ref = dfkd.count_params(_RefModel(b, l))
            with torch.device('meta'): assert dfkd.count_params(ConvLSTMUNet(b, l, residual=None)) == ref, (b, l)
            h = 12*2**(b - 1)
            assert t.loc[(b, l), 'params'] == ref + (h//2*h if b > 1 else 0), (b, l)   # + the 1×1 projection (h/2 → h)
    assert abs(t.loc[(4, 1), 'params'] - PAPER_PARAMS) < 0.015*PAPER_PARAMS, t.loc[(4, 1)]
    others = t.drop(index=(4, 1)).params
    assert (abs(others - PAPER_PARAMS) > 0.1*PAPER_PARAMS).all()     # no other student is near 0.72M

def test_student_computes_the_reference_function():
    torch.manual_seed(0)
    x = torch.rand(2, 5, 1, 16, 16)
    for b, l in [(1, 2), (3, 1), (2, 2)]:
        ref = _RefModel(b, l).eval()
        for p in ref.parameters(): torch.nn.init.normal_(p, std=0.3)     # away from BatchNorm's identity init
        ours, last = ConvLSTMUNet(b, l, residual=None).eval(), ConvLSTMUNet(b, l).eval()
        _load_reference(ours, ref); _load_reference(last, ref)
        with torch.no_grad():
            y = ref(x)
            assert torch.allclose(ours(x), y, atol=1e-5), (b, l)
            for p in last.shortcut.parameters(): torch.nn.init.zeros_(p)
            assert torch.allclose(last(x), y, atol=1e-5), (b, l)               # a zero shortcut: the reference again
            for p in last.shortcut.parameters(): torch.nn.init.normal_(p)
            assert (b == 1) == torch.allclose(last(x), y, atol=1e-5), (b, l)   # a one-block student has no shortcut

def test_student_variants():
    with torch.device('meta'):
        base, skips = ConvLSTMUNet(4, 1, residual=None), ConvLSTMUNet(4, 1, residual=None, skips=True, relu=True)
        assert dfkd.count_params(skips) == 741793 and dfkd.count_params(base) == 714577
        assert dfkd.count_params(ConvLSTMUNet(4, 1, residual=None, relu=True)) == dfkd.count_params(base)   # ReLU has no weights
        assert sorted(ConvLSTMUNet(4, 2, residual='all').shortcut) == ['1', '2', '3'] and not len(ConvLSTMUNet(1, 2).shortcut)
    assert not any(isinstance(m, torch.nn.ReLU) for m in ConvLSTMUNet(3, 1).modules())
    assert sum(isinstance(m, torch.nn.ReLU) for m in ConvLSTMUNet(3, 1, relu=True).modules()) == 2
    with pytest.raises(ValueError, match='residual'): ConvLSTMUNet(2, 1, residual='first')
    for kw in (dict(), dict(skips=True, relu=True), dict(residual='all'), dict(residual=None)):
        m = build_student(3, 1, **kw)
        assert m(torch.rand(1, 3, 1, 16, 16)).shape == (1, 3, 1, 16, 16)


# ---- the test set: every TEST video that can be scored ----------------------------------------------------------

def test_dfkd_test_set_keeps_videos_with_other_irregular_tracings(phantom_dir, tmp_path):
    import shutil, pandas as pd
    from echobook.data.echonet import scan_dataset
    d = tmp_path/'data'; shutil.copytree(phantom_dir, d)
    test = scan_dataset(d).split('TEST')
    assert [r.FileName for r in dfkd_eval.dfkd_test_set(d)[0]] == [r.FileName for r in test]
    tr, fl = pd.read_csv(d/'VolumeTracings.csv'), pd.read_csv(d/'FileList.csv')
    ids = tr.FileName.str.replace('.avi', '', regex=False)
    r0, r1, r2 = test[:3]
    free = next(f for f in range(r0.n_frames) if f not in (r0.ed_frame, r0.es_frame))
    extra = tr[ids == r0.FileName].iloc[:25].assign(Frame=free)                 # a third traced frame with 25 lines
    tr = pd.concat([tr, extra])
    tr = tr[~((tr.FileName.str.replace('.avi', '', regex=False) == r2.FileName) & (tr.Frame == r2.es_frame))]   # ES tracing gone
    tr.to_csv(d/'VolumeTracings.csv', index=False)
    fl.loc[fl.FileName.str.replace('.avi', '', regex=False) == r1.FileName, 'EF'] = float('nan'); fl.to_csv(d/'FileList.csv', index=False)
    recs, left = dfkd_eval.dfkd_test_set(d)
    names = [r.FileName for r in recs]
    assert r0.FileName in names and r0.FileName not in [r.FileName for r in scan_dataset(d).split('TEST')]
    assert sorted(left.FileName) == sorted([r1.FileName, r2.FileName]) and len(names) == len(test) - 2
    assert left.set_index('FileName').loc[r1.FileName, 'reason'].startswith('EF')
    kept = next(r for r in recs if r.FileName == r0.FileName)
    assert (kept.ed_frame, kept.es_frame) == (r0.ed_frame, r0.es_frame)

def test_foreground_baseline(phantom_dir):
    from echobook.data.echonet import keypoints_to_mask
    recs = dfkd_eval.dfkd_test_set(phantom_dir)[0]
    fg = dfkd_eval.foreground_scores(recs)
    a = np.array([keypoints_to_mask(r.ed_kpts).mean() for r in recs])
    assert np.allclose(fg.iou_ed, a) and np.allclose(fg.dice_ed, 2*a/(1 + a))


def test_student_is_causal_and_streams():
    m = build_student(2, 2, filters=4).eval()
    x = torch.rand(2, 9, 1, 16, 16)
    with torch.no_grad():
        full = m(x)
        state, parts = None, []
        for t in range(9):   # frame by frame, hidden states carried over
            y, state = m(x[:, t:t + 1], state, return_state=True); parts.append(y)
        x2 = x.clone(); x2[:, 6:] = 0
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        assert torch.allclose(m(x2)[:, :6], full[:, :6], atol=1e-6)
        assert torch.allclose(dfkd.Chunked(m, 4)(x), full, atol=1e-5)

def test_echonet_checkpoint_with_module_prefix(tmp_path):
    net = segmenters.build_segmenter('deeplabv3_resnet50')
    sd = {f'module.{k}': v for k, v in net.net.state_dict().items()}
    torch.save({'epoch': 3, 'state_dict': sd, 'opt_dict': {}}, tmp_path/segmenters.ECHONET_SEG_WEIGHTS)
    loaded = segmenters.build_segmenter('deeplabv3_resnet50', pretrained=True, weights_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), net.net.state_dict().values()))
    with pytest.raises(segmenters.MissingWeightsError, match='deeplabv3_resnet50_random.pt'):
        segmenters.build_segmenter('deeplabv3_resnet50', pretrained=True, weights_dir=tmp_path/'empty')

def test_echonet_checkpoint_that_does_not_fit(tmp_path):
    torch.save({'state_dict': {'module.backbone.conv1.weight': torch.zeros(1)}}, tmp_path/segmenters.ECHONET_SEG_WEIGHTS)
    with pytest.raises(ValueError, match='does not fit'):
        segmenters.build_segmenter('deeplabv3_resnet50', pretrained=True, weights_dir=tmp_path)


# ---- the teacher-targets cache knows its data --------------------------------------------------------------------

def test_targets_follow_the_videos_and_the_teacher(tmp_path):
    from echobook.data.echonet import ensure_phantom
    synth = ensure_phantom(tmp_path/'syn', n_videos=6, domain='synthetic', progress=False)
    teacher, out = segmenters.build_segmenter('unet', size=16), tmp_path/'targets'
    index = dfkd.prepare_targets(teacher, synth, out, size=16, max_frames=4, progress=False)
    files = {n: out/f'{n}.npy' for n in index.FileName}
    stamp = lambda: {n: p.stat().st_mtime_ns for n, p in files.items()}
    first = stamp()
    dfkd.prepare_targets(teacher, synth, out, size=16, max_frames=4, progress=False)
    assert stamp() == first                                   # nothing changed: nothing relabelled
    edited = index.FileName[0]
    v = synth/'Videos'/f'{edited}.avi'; v.write_bytes(v.read_bytes())
    dfkd.prepare_targets(teacher, synth, out, size=16, max_frames=4, progress=False)
    now = stamp()
    assert now[edited] > first[edited] and all(now[n] == first[n] for n in files if n != edited)
    dfkd.prepare_targets(segmenters.build_segmenter('unet', size=16, seed=1), synth, out, size=16, max_frames=4, progress=False)
    assert all(t > now[n] for n, t in stamp().items())        # another teacher: everything relabelled
    meta = json.loads((out/'index.json').read_text())
    assert meta['teacher'] == module_hash(segmenters.build_segmenter('unet', size=16, seed=1)) and len(meta['videos']) == len(files)


# ---- CLIP evaluator ---------------------------------------------------------------------------------------------

def test_tiny_open_clip_scores_masked_frames(tmp_path):
    scorer = dfkd_eval.load_clip_scorer(dfkd_eval.write_tiny_clip(tmp_path/'clip'))
    frames = np.random.default_rng(0).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    masks = np.zeros((5, 112, 112), bool); masks[:, 40:70, 40:70] = True
    q = dfkd_eval.mask_quality(scorer, frames, masks)
    assert list(q.columns) == ['wall', 'nothing', 'lv', 'score'] and len(q) == 5 and np.isfinite(q.values).all()
    assert np.allclose(q.score, q.wall + q.nothing - q.lv)
    assert dfkd_eval.mitral_phase_signal(scorer, frames).shape == (5,)
    with pytest.raises(segmenters.MissingWeightsError, match='echo-clip'): dfkd_eval.load_echoclip(tmp_path/'none')


# ---- profile, table configs, citations ---------------------------------------------------------------------------

def test_profile_and_typed_overrides():
    from echobook.core import ConfigError
    tiny, paper = dfkd.dfkd_config('tiny'), dfkd.dfkd_config('paper', epochs='3', lr='1e-4')
    assert not tiny['pretrained'] and paper['pretrained'] and paper['teacher'] == 'deeplabv3_resnet50'
    assert paper['epochs'] == 3 and paper['lr'] == 1e-4
    with pytest.raises(ConfigError, match='patiense'): dfkd.dfkd_config('tiny', patiense=3)

def test_table_configs_match_the_notebook_and_the_citations():
    from echobook.config import load_table_config
    from echobook.sweeps import expand_grid, check_parameters
    for table, n in [('dfkd_table1', 16), ('dfkd_table2', 1)]:
        cfg = load_table_config(table)
        for profile in ('tiny', 'paper'):
            configs = expand_grid(cfg, profile)
            check_parameters(NB, configs)
            assert len(configs) == n
    t1, t2 = dfkd_eval.paper_numbers('table1'), dfkd_eval.paper_numbers('table2')
    assert len(t1.dropna(subset=['blocks'])) == 16 and (t1.source == 'Table 1').all()
    assert t2.set_index('label').loc['EchoDFKD* (entire test set)', 'afd_es'] == 2.83


# ---- the experiment notebook, end to end -------------------------------------------------------------------------

TINY = dict(profile='tiny', phantom_videos=24, blocks=2, layers=1, threads=1)   # the tiny profile itself

def _run(tmp_path, name, **params):
    "Execute the experiment notebook with the TINY settings and `params`."
    import papermill as pm
    pm.execute_notebook(str(NB), str(tmp_path/f'{name}.ipynb'), parameters={**TINY, **params}, kernel_name='echobook',
                        cwd=str(tmp_path), progress_bar=False)

@pytest.mark.slow
@pytest.mark.learning   # a tiny-profile result (minutes): `make test-learning`, not `make test`
def test_experiment_notebook_distils_and_overwrite_retrains(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('ECHOBOOK_RUNS', str(tmp_path/'runs'))
    run = tmp_path/'run'
    _run(tmp_path, 'first', run_dir=str(run), clip_model='tiny', clip_videos=1)
    m = json.loads((run/'metrics.json').read_text())['summary']
    assert json.loads((run/'status.json').read_text())['state'] == 'done'
    for who in ('model', 'teacher', 'untrained'):
        for k in ('dice', 'iou', 'afd_ed', 'afd_es'): assert np.isfinite(m[f'{who}/{k}/mean'])
    assert m['model/dice/mean'] > m['untrained/dice/mean'] + 0.2, m     # the student learned from the teacher
    assert m['model/dice/mean'] > m['foreground/dice/mean'] + 0.2, m    # ... more than the all-foreground mask
    assert m['model/afd_es/mean'] < m['untrained/afd_es/mean'], m
    assert m['truth/afd_es/mean'] <= 1
    for f in ('per_video.csv', 'areas.csv', 'clip.csv', 'log.csv', 'best.pth', 'checkpoint.pth', 'figures/area_curves.png'):
        assert (run/f).exists(), f
    config = json.loads((run/'config.json').read_text())
    teacher_log = Path(config['teacher_dir'])/'log.csv'
    t_teacher, old_ckpt = teacher_log.stat().st_mtime_ns, torch.load(run/'checkpoint.pth', weights_only=False)
    # another lr in the same folder: refused without overwrite, retrained from scratch with it
    with pytest.raises(pm.PapermillExecutionError, match='another config'):
        _run(tmp_path, 'refused', run_dir=str(run), lr=3e-3)
    _run(tmp_path, 'second', run_dir=str(run), lr=3e-3, overwrite=True)
    new_ckpt, m2 = torch.load(run/'checkpoint.pth', weights_only=False), json.loads((run/'metrics.json').read_text())
    assert json.loads((run/'config.json').read_text())['lr'] == 3e-3 and new_ckpt['config']['lr'] == 3e-3
    assert new_ckpt['config_hash'] != old_ckpt['config_hash'] and m2['epochs_run'] == dfkd.dfkd_config('tiny')['epochs'] and m2['train_time_s'] > 0
    assert m2['summary']['model/dice/mean'] != m['model/dice/mean']
    assert len((run/'attempts.jsonl').read_text().splitlines()) == 1          # a fresh folder, not a resumed one
    moved = list(tmp_path.glob('run.replaced-*'))
    assert len(moved) == 1 and json.loads((moved[0]/'config.json').read_text())['lr'] == 1e-3
    assert teacher_log.stat().st_mtime_ns == t_teacher                       # the shared teacher was not retrained
    assert config['teacher_dir'] == json.loads((run/'config.json').read_text())['teacher_dir']

@pytest.mark.slow
def test_experiment_notebook_missing_teacher_weights(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('ECHOBOOK_WEIGHTS', str(tmp_path/'no-weights'))
    monkeypatch.setenv('ECHOBOOK_RUNS', str(tmp_path/'runs'))
    with pytest.raises(pm.PapermillExecutionError, match='deeplabv3_resnet50_random.pt'):
        _run(tmp_path, 'out', pretrained=True, teacher='deeplabv3_resnet50', phantom_videos=6, run_dir=str(tmp_path/'run'))
    assert json.loads((tmp_path/'run'/'status.json').read_text())['state'] == 'failed'

@pytest.mark.slow
def test_experiment_notebook_paper_profile_needs_data(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('ECHOBOOK_RUNS', str(tmp_path/'runs'))
    with pytest.raises(pm.PapermillExecutionError, match='data_dir'):
        _run(tmp_path, 'out', profile='paper', run_dir=str(tmp_path/'run'))
    assert not (tmp_path/'run').exists() and not (tmp_path/'runs').exists()
