"""The paper path at scale: `echobook reproduce T --profile paper --smoke` / `--dry-run` (echobook.sweeps)."""
import contextlib, io, json, math
from pathlib import Path
import pandas as pd, pytest

from echobook.config import list_tables, load_table_config
from echobook.core import atomic_write_json
from echobook.runs import RunDir
from echobook.sweeps import (expand_grid, fit_batch, format_smoke, list_runs, paper_settings, paper_stages, plan_sweep,
                             projected_hours, reproduce, run_folders, smoke_root, smoke_table, table_cost, task_of)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    "Kernels started by papermill inherit this: keep their CPU use modest."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('MKL_NUM_THREADS', '1')


# --- the parts: batch rule, what a paper run trains on, projection ---------------------------------------------------

def test_fit_batch_memory_rule():
    assert fit_batch(2e9, 3e9, 10e9, 20) == 9                     # 1 GB per sample over a 1 GB base
    assert fit_batch(2e9, 3e9, 100e9, 20) == 20                   # the paper's batch fits
    assert fit_batch(2e9, 3e9, 1e9, 20) == 1                      # never below one
    assert fit_batch(2e9, 2e9, 4e9, 20) == 11                     # a flat probe still costs 10 % of batch 1 per sample
    assert fit_batch(2e9, 3e9, 100e9, 20, max_batch=4) == 4
    assert fit_batch(2e9, 3e9, 1e9, 20, at=2) == 2                # a task's min_batch is the floor (KoLeo, ASPP BatchNorm)
    assert fit_batch(4e9, 5e9, 10e9, 20, at=2) == 8               # probes at 2 and 3: 1 GB per sample over a 2 GB base


def test_paper_batch_of_every_paper_config():
    "Each configuration's paper batch: its batch_size, else (null: per model) its dominant fit's; tasks that cannot train on one image say so."
    from echobook.sweeps import paper_batch, paper_runs
    for table in list_tables():
        cfg = load_table_config(table)
        for c in expand_grid(cfg, 'paper'):
            assert paper_batch(task_of(cfg), paper_settings(cfg, c.params)) >= 1, (table, c.id)
    assert paper_runs('pretrain')['min_batch'] == 2 and paper_runs('lvh')['min_batch'] == 2


@pytest.mark.parametrize('table', list_tables())
def test_every_paper_config_has_stages(table):
    "Each paper configuration of every table projects from at least one stage (a probe: its embedding pass)."
    cfg = load_table_config(table)
    for c in expand_grid(cfg, 'paper'):
        st = paper_stages(task_of(cfg), paper_settings(cfg, c.params))
        assert st and all(s['batch'] >= 1 and s['items'] >= 0 for s in st)
        assert sum(s['items'] for s in st) > 0, (table, c.id)


def test_projection_scales_to_the_paper_batch():
    cfg = load_table_config('table4')                              # 10 % data, 100 epochs, batch 20
    st = paper_stages('landmarks', paper_settings(cfg, expand_grid(cfg, 'paper')[0].params))
    assert st[0]['items'] == 100 * math.ceil(7394 * 0.1)
    h, how = projected_hours(st, {'.': dict(step_s=2.0, batch_size=4, items_per_step=4)})
    assert h == pytest.approx(100 * 740 * 0.5 / 3600) and '× 20/4' in how
    assert math.isnan(projected_hours(st, {})[0])                # no measurement: unknown, not zero


# --- smoke folders never count as results -----------------------------------------------------------------------------

def test_smoke_folders_are_not_results(tmp_path):
    rd = smoke_root('table3', tmp_path)/'mvit_v2_s.echoprime-k0-aug-gcn'/'batch1'
    run = RunDir(rd); rd.mkdir(parents=True)
    atomic_write_json(rd/'status.json', {'state': 'done'}); atomic_write_json(rd/'metrics.json', {'summary': {'model/dice_ed/mean': 0.9}})
    params = next(c.params for c in expand_grid(load_table_config('table3'), 'paper') if c.id == rd.parent.name)
    atomic_write_json(rd.parent/'result.json', {'status': 'ok', 'projected_gpu_h': 5.0, 'device': 'cpu', 'measured': 'now', 'params': params})
    assert run_folders(tmp_path/'table3') == [] and len(list_runs('table3', tmp_path)) == 0
    plan = plan_sweep('table3', 'paper', runs=tmp_path, allow_phantom=True)
    assert set(plan.state) == {'new'} and not any('/_smoke/' in d for d in plan.run_dir)
    cost = table_cost('table3', tmp_path)                          # ... but the dry run uses its measurement
    row = cost[cost.id == 'mvit_v2_s.echoprime-k0-aug-gcn'].iloc[0]
    assert row.gpu_h == 5.0 and row.source.startswith('measured-on-cpu')


# --- dry run: GPU-hours and the SLURM request --------------------------------------------------------------------------

def test_dry_run_prints_cost_and_slurm_request(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert reproduce('table4', 'paper', runs=tmp_path, dry_run=True, sets=['devices=2']) == 0
    text = out.getvalue()
    assert 'GPU-hours' in text and 'estimate' in text and '1.3' in text         # 13 h × 10 % per configuration
    assert 'SLURM request' in text and 'gpus_per_node=2' in text and 'timeout_min=240' in text
    with contextlib.redirect_stdout(io.StringIO()) as out:
        reproduce('ef_videomae', 'paper', runs=tmp_path, dry_run=True)
    assert 'unknown — run --smoke' in out.getvalue()


def test_devices_is_not_part_of_a_runs_identity(tmp_path):
    plan = plan_sweep('table4', 'paper', runs=tmp_path, allow_phantom=True)
    rd = Path(plan.run_dir[0]); rd.mkdir(parents=True)
    atomic_write_json(rd/'sweep.json', {'params': plan.params[0]})
    again = plan_sweep('table4', 'paper', runs=tmp_path, allow_phantom=True, overrides={'devices': 2})
    assert again.action[0] != 'conflict'


# --- a real smoke run through the experiment notebook ------------------------------------------------------------------

@pytest.mark.slow   # ~1 min on 2 idle cores (4 min on a loaded machine): a papermill kernel, two fits of a 32² MViT
def test_smoke_one_landmark_config_32px(tmp_path):
    "The pipeline of a smoke run (probe, run, measure, project, report) on one table3 configuration at 32² (fast)."
    df = smoke_table('table3', steps=2, device='cpu', runs=tmp_path, limit=1, max_batch=1,
                     overrides={'size': 32, 'k': 0, 'head': 'mlp'})
    r = df.iloc[0]
    assert r.status == 'ok', r.error
    assert r.step_s > 0 and r.peak_mem_gb > 0 and r.batch_size == 1 and r.paper_batch_size == 20 and r.projected_gpu_h > 0
    assert (smoke_root('table3', tmp_path)/r.id/'result.json').exists() and len(list_runs('table3', tmp_path)) == 0
    assert 'projected full paper run' in format_smoke(df)


ONE_PER_PAPER = [('table3', {'k': 0, 'head': 'mlp', 'encoder': 'mvit_v2_s.echoprime'}), ('dfkd_table1', {}),
                 ('probing_table3', {}), ('ef_echoapex', {}), ('ef_videomae', {})]

@pytest.mark.heavy   # paper shapes on a CPU: 5–30 min per paper on 2 cores (`make test-heavy`)
@pytest.mark.timeout(3600)
@pytest.mark.parametrize('table,sets', ONE_PER_PAPER)
def test_smoke_one_config_per_paper(tmp_path, table, sets):
    "One configuration of each paper at its paper shapes: passes and reports step time, memory and projected hours."
    df = smoke_table(table, steps=2, device='cpu', runs=tmp_path, limit=1, max_batch=2, overrides=sets)
    r = df.iloc[0]
    assert r.status == 'ok', r.error
    assert r.peak_mem_gb > 0 and r.batch_size >= 1 and r.step_s > 0 and r.projected_gpu_h > 0
