"""The probing experiment notebook (paper 002) run with papermill on a small phantom, and its sweeps via `echobook reproduce`."""
import json, os
from pathlib import Path
import pandas as pd
import pytest

REPO = Path(__file__).parents[1]
NB = REPO/'nbs'/'experiments'/'probing.ipynb'
TINY = dict(encoder='resnet18_2d.in1k', size=32, profile='tiny')  # the smallest registered image encoder, 32 px


@pytest.fixture(scope='module')
def views_dir(tmp_path_factory):
    "A small phantom view data set (10 classes; train, T1, T2), shared by the tests of this module."
    from echobook.data.views import make_view_phantom
    return make_view_phantom(tmp_path_factory.mktemp('views')/'views', dict(train=60, T1=30, T2=20), size=64, frames=(8, 10),
                             progress=False)


def _run(tmp_path, views_dir, **params):
    import papermill as pm
    rd = tmp_path/'run'
    pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), kernel_name='echobook', cwd=str(tmp_path), progress_bar=False,
                        parameters=dict(data_dir=str(views_dir), cache_dir=str(tmp_path/'cache'), run_dir=str(rd), **TINY, **params))
    return rd


def test_probe_sequence_curve(tmp_path, views_dir, monkeypatch):
    "Linear probing, sequence-based: a finished run whose curve covers the ladder with seeds, T2 beside T1."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rd = _run(tmp_path, views_dir, method='probe', sampling='sequence', seeds=2, n_aug=0)
    assert json.loads((rd/'status.json').read_text())['state'] == 'done'
    curve = pd.read_csv(rd/'curve.csv')
    assert sorted(curve.n.unique()) == [1, 2, 4, 8] and set(curve.split) == {'T1', 'T2'} and curve.seed.nunique() == 2
    m = json.loads((rd/'metrics.json').read_text())
    assert {'T1/acc_img', 'T1/acc_seq', 'T2/acc_img', 'T2/bacc_seq'} <= set(m['summary'])
    t1 = curve[curve.split == 'T1'].groupby('n').acc_img.mean()
    assert t1.iloc[-1] > t1.iloc[0], t1
    assert (rd/'figures'/'curve.png').exists() and (rd/'confusion_T2.csv').exists()


def test_finetune_one_size(tmp_path, views_dir, monkeypatch):
    "Full fine-tuning of one image-based size, scaled down to 64 samples."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rd = _run(tmp_path, views_dir, method='finetune', sampling='image', n_train=32, min_samples=64, n_aug=0)
    curve = pd.read_csv(rd/'curve.csv')
    assert curve.n.unique().tolist() == [32] and curve.epochs.iloc[0] == 2 and curve.samples_seen.iloc[0] == 64
    log = pd.read_csv(rd/'train_log.csv')
    assert len(log) == 2
    m = json.loads((rd/'metrics.json').read_text())
    assert m['trainable_params'] == m['n_params'] > 0 and m['inference_ms'] > 0


@pytest.mark.slow
def test_reproduce_probing_and_finetuning(tmp_path, views_dir, monkeypatch):
    "`echobook reproduce` runs probing and fine-tuning configurations (one encoder each here) and the report is built."
    from echobook.sweeps import run_sweep
    from echobook.tasks.probing import probing_report, collect_curves
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    runs = tmp_path/'runs'
    common = dict(size=32, seeds=2, n_aug=0, cache_dir=str(tmp_path/'cache'))
    for table, sets in [('probing_fig2', dict(encoder='resnet50.a1_in1k')),
                        ('probing_fig3', dict(encoder='resnet50.a1_in1k', n_train=32, min_samples=64)),
                        ('probing_table3', dict(encoder='resnet50.a1_in1k', min_samples=64))]:
        plan = run_sweep(table, 'tiny', data=str(views_dir), overrides={**common, **sets}, runs=runs)
        assert (plan.state == 'done').all(), plan[['id', 'state', 'error']].to_string()
    curves, results = collect_curves(runs=runs)
    assert set(curves.table) == {'probing_fig2', 'probing_fig3', 'probing_table3'}
    assert {'finetune', 'probe'} == set(results.method)
    out = probing_report(runs=runs)
    assert (runs/'probing_table3'/'probing_fig5.png').exists() and (runs/'probing_table3'/'probing_table3.csv').exists()
    t3 = pd.read_csv(runs/'probing_table3'/'probing_table3.csv', header=[0, 1], index_col=0)
    assert t3.shape[0] == 1 and t3.shape[1] == 8  # ours and the paper's T1/T2 × img/seq
