"""EchoDFKD (paper 004): aFD on constructed curves, the student family, the teacher loader, the CLIP evaluator, the
table configs, the CLI and (slow) the experiment notebook end to end through papermill."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echobook.tasks import dfkd
from echobook.tasks.dfkd import afd_frame, contiguous_blocks, ConvLSTMUNet, build_student

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
    truth = dfkd.truth_areas(phantom_dir)
    t = dfkd.afd_table(truth, recs)
    assert len(t) == len(recs) and t.afd_es.max() <= 1 and t.afd_ed.max() <= 2   # the true area: the method's floor
    with pytest.raises(ValueError, match='no curve'): dfkd.afd_table({}, recs)


# ---- student family, teacher loader -----------------------------------------------------------------------------

def test_every_student_builds_under_4m_parameters():
    t = dfkd.student_complexity(sizes=(56,))
    assert len(t) == 16 and (t.params < 4e6).all()
    assert t.set_index(['B', 'l']).loc[(4, 1), 'params'] == 741793
    for b in range(1, 5):
        for l in range(1, 5):
            with torch.device('meta'): assert dfkd.count_params(ConvLSTMUNet(b, l)) == t.set_index(['B', 'l']).loc[(b, l), 'params']

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

def test_teacher_checkpoint_with_module_prefix(tmp_path):
    net = dfkd.build_teacher('deeplabv3_resnet50')
    sd = {f'module.{k}': v for k, v in net.net.state_dict().items()}
    torch.save({'epoch': 3, 'state_dict': sd}, tmp_path/dfkd.TEACHER_WEIGHTS)
    loaded = dfkd.build_teacher(pretrained=True, weights_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), net.net.state_dict().values()))
    with pytest.raises(dfkd.MissingWeightsError, match='deeplabv3_resnet50_random.pt'):
        dfkd.build_teacher(pretrained=True, weights_dir=tmp_path/'empty')

def test_teacher_checkpoint_that_does_not_fit(tmp_path):
    torch.save({'state_dict': {'module.backbone.conv1.weight': torch.zeros(1)}}, tmp_path/dfkd.TEACHER_WEIGHTS)
    with pytest.raises(ValueError, match='does not fit'): dfkd.build_teacher(pretrained=True, weights_dir=tmp_path)


# ---- CLIP evaluator ---------------------------------------------------------------------------------------------

def test_tiny_open_clip_scores_masked_frames(tmp_path):
    scorer = dfkd.load_clip_scorer(dfkd.write_tiny_clip(tmp_path/'clip'))
    frames = np.random.default_rng(0).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    masks = np.zeros((5, 112, 112), bool); masks[:, 40:70, 40:70] = True
    q = dfkd.mask_quality(scorer, frames, masks)
    assert list(q.columns) == ['wall', 'nothing', 'lv', 'score'] and len(q) == 5 and np.isfinite(q.values).all()
    assert np.allclose(q.score, q.wall + q.nothing - q.lv)
    assert dfkd.mitral_phase_signal(scorer, frames).shape == (5,)
    with pytest.raises(dfkd.MissingWeightsError, match='echo-clip'): dfkd.load_echoclip(tmp_path/'none')


# ---- configs, CLI -----------------------------------------------------------------------------------------------

def test_table_configs_match_the_notebook_and_the_citations():
    from echobook.sweeps import load_config, expand_grid, check_parameters, notebook_path
    for table, n in [('dfkd_table1', 16), ('dfkd_table2', 1)]:
        cfg = load_config(table)
        for profile in ('tiny', 'paper'):
            configs = expand_grid(cfg, profile)
            check_parameters(notebook_path(cfg), configs)
            assert len(configs) == n
    t1, t2 = dfkd.paper_numbers('table1'), dfkd.paper_numbers('table2')
    assert len(t1.dropna(subset=['blocks'])) == 16 and (t1.source == 'Table 1').all()
    assert t2.set_index('label').loc['EchoDFKD* (entire test set)', 'afd_es'] == 2.83

def test_cli_afd_and_complexity(phantom_dir, capsys):
    from echobook.cli import main
    assert main(['afd', str(phantom_dir), str(phantom_dir/'PhantomTruth.csv')]) == 0
    assert 'aFD over' in capsys.readouterr().out
    assert main(['dfkd-complexity', '--sizes', '56']) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 17


# ---- the experiment notebook, end to end -------------------------------------------------------------------------

TINY = dict(phantom_videos=12, teacher_epochs=1, teacher_size=32, size=32, blocks=2, layers=1, epochs=1, max_frames=16,
            seq_len=8, batch_size=4, clip_model='tiny', clip_videos=1, threads=1)

@pytest.mark.slow
def test_experiment_notebook_runs(tmp_path):
    import papermill as pm
    run = tmp_path/'run'
    pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters={**TINY, 'run_dir': str(run)}, kernel_name='echobook',
                        cwd=str(tmp_path), progress_bar=False)
    m = json.loads((run/'metrics.json').read_text())
    assert json.loads((run/'status.json').read_text())['state'] == 'done'
    for who in ('model', 'teacher', 'untrained'):
        for k in ('dice', 'iou', 'afd_ed', 'afd_es'): assert np.isfinite(m['summary'][f'{who}/{k}/mean'])
    assert m['summary']['truth/afd_es/mean'] <= 1 and m['trainable_params'] > 0 and m['clip']
    for f in ('per_video.csv', 'areas.csv', 'log.csv', 'best.pth', 'figures/area_curves.png'): assert (run/f).exists(), f
    # the teacher and its labels are shared: a second student reuses them (no retraining)
    teacher_dir = Path(json.loads((run/'config.json').read_text())['teacher_dir'])
    stamp = (teacher_dir/'teacher.pt').stat().st_mtime
    pm.execute_notebook(str(NB), str(tmp_path/'out2.ipynb'), parameters={**TINY, 'layers': 2, 'clip_model': 'none', 'run_dir': str(tmp_path/'run2')},
                        kernel_name='echobook', cwd=str(tmp_path), progress_bar=False)
    assert (teacher_dir/'teacher.pt').stat().st_mtime == stamp

@pytest.mark.slow
def test_experiment_notebook_missing_teacher_weights(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv('ECHOBOOK_WEIGHTS', str(tmp_path/'no-weights'))
    with pytest.raises(pm.PapermillExecutionError, match='deeplabv3_resnet50_random.pt'):
        pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters={**TINY, 'pretrained': True, 'run_dir': str(tmp_path/'run')},
                            kernel_name='echobook', cwd=str(tmp_path), progress_bar=False)
    assert json.loads((tmp_path/'run'/'status.json').read_text())['state'] == 'failed'
