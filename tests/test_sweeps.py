"""Sweeps, run states, the SLURM (submitit) path and the table builder: what `echobook reproduce / runs / table` call."""
import contextlib, io, json, os, platform, signal, subprocess, sys, time
from pathlib import Path
import pandas as pd, pytest

from echobook.core import ConfigError, atomic_write_json
from echobook.runs import RunDir
from echobook.config import list_tables, load_table_config, notebook_path
from echobook.jobs import run_state, example_notebook
from echobook.sweeps import expand_grid, parse_sets, check_parameters, run_sweep, plan_sweep, list_runs, reproduce, show_runs
from echobook.tables import build_table, fake_runs, collect_results
from echobook.results import build_figure, figure_data, plotly_figure, print_table

LANDMARKS = Path(__file__).parents[1]/'nbs'/'experiments'/'landmarks.ipynb'


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    "Kernels started by papermill inherit this: keep their CPU use modest."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('MKL_NUM_THREADS', '1')


@pytest.fixture
def toy(tmp_path):
    "A sweep config over the stand-in notebook: k = 0, 1 work, k = -1 is broken (fails before start_run)."
    nb = example_notebook(tmp_path/'toy.ipynb')
    cfg = tmp_path/'toy.yaml'
    cfg.write_text(f'notebook: {nb}\ngrid: {{k: [0, 1, -1]}}\nfixed: {{head: gcn}}\n'
                   'profiles: {tiny: {set: {augment: false}}, paper: {set: {augment: true}}}\n'
                   'table: {rows: [k], columns: [dice_ed, mke_ed]}\n')
    return cfg


# --- grid expansion -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('table,paper,tiny', [('table2', 16, 8), ('table3', 20, 12), ('table4', 8, 3), ('fig2', 35, 3), ('figA1', 136, 3)])
def test_shipped_configs_expand(table, paper, tiny):
    cfg = load_table_config(table)
    for profile, n in [('paper', paper), ('tiny', tiny)]:
        configs = expand_grid(cfg, profile)
        assert len(configs) == n and len({c.id for c in configs}) == n
        check_parameters(LANDMARKS, configs)   # every parameter exists in the landmark notebook
        assert all(c.params['profile'] == profile and c.params['pretrained'] == (profile == 'paper') for c in configs)


def test_grid_ids_exclusions_and_overrides():
    cfg = load_table_config('table3')
    ids = [c.id for c in expand_grid(cfg, 'paper')]
    assert 'mvit_v2_s.echoprime-k2-aug-gcn' in ids and 'panecho.panecho-k16-noaug-mlp' in ids
    assert not any(i.startswith('panecho.panecho-k2-') for i in ids)   # PanEcho has no k = 2 (config's exclude)
    assert ids == [c.id for c in expand_grid(cfg, 'paper')]            # stable
    one = expand_grid(cfg, 'tiny', {'k': [0, 16], 'head': 'gcn', 'augment': True, 'epochs': 2})
    assert [c.id for c in one] == ['mvit_v2_s.echoprime-k0-aug-gcn', 'mvit_v2_s.echoprime-k16-aug-gcn']
    assert all(c.params['epochs'] == 2 for c in one)
    t2 = expand_grid(load_table_config('table2'), 'paper', {'encoder': 'vit_base_patch16_224.in21k'})
    assert {(c.params['encoder'], c.params['k']) for c in t2} == {('vit_base_patch16_224.in21k', 12)}
    with pytest.raises(ValueError, match="no such value on the grid axis 'k'"): expand_grid(cfg, 'tiny', {'k': 3})
    with pytest.raises(ValueError, match=r"\[3\]"): expand_grid(cfg, 'tiny', {'k': [0, 3]})
    with pytest.raises(ValueError, match='unknown profile'): expand_grid(cfg, 'huge')


def test_config_errors_and_sets():
    assert {'table2', 'table3', 'table4', 'fig2', 'figA1'} <= set(list_tables())
    with pytest.raises(ConfigError, match=r'available: .*table3'): load_table_config('table9')
    assert parse_sets(['k=2', 'augment=false', 'fraction=0.1', 'k=[0, 2]']) == {'k': [0, 2], 'augment': False, 'fraction': 0.1}
    with pytest.raises(ValueError, match='key=value'): parse_sets(['k'])
    assert notebook_path(load_table_config('table3')) == LANDMARKS


# --- sweeps over the stand-in notebook ---------------------------------------------------------------------------------

def test_sweep_completes_skips_and_reports_broken(toy, tmp_path):
    runs = tmp_path/'runs'
    out = run_sweep(toy, runs=runs, jobs=2)                                      # two configurations at a time
    assert list(out.state) == ['done', 'done', 'failed']
    broken = Path(out.run_dir[2])
    assert 'deliberately broken' in RunDir(broken).status['error']
    assert (broken/'notebook.ipynb').exists() and (broken/'error.txt').exists()   # the executed notebook is kept
    stamps = {p: (Path(p)/'status.json').stat().st_mtime_ns for p in out.run_dir}
    again = run_sweep(toy, runs=runs)                                            # a second call does no work
    assert list(again.action) == ['skip', 'skip', 'failed'] and again.seconds.isna().all()
    assert stamps == {p: (Path(p)/'status.json').stat().st_mtime_ns for p in out.run_dir}
    retry = run_sweep(toy, runs=runs, retry_failed=True)                         # --retry-failed redoes only the failed one
    assert list(retry.action) == ['skip', 'skip', 'run'] and retry.state[2] == 'failed'
    assert (broken/'attempts'/'1'/'status.json').exists()
    with contextlib.redirect_stdout(io.StringIO()) as o: rc = reproduce(str(toy), runs=runs)
    assert rc == 1 and 'failed: k-1' in o.getvalue() and '--retry-failed' in o.getvalue()
    runs_df = list_runs('toy', runs)
    assert dict(zip(runs_df.id, runs_df.state)) == {'k0': 'done', 'k1': 'done', 'k-1': 'failed'} and runs_df.value.notna().sum() == 2


def test_interrupted_and_queued_states(toy, tmp_path):
    "A run left 'running' by a dead process is planned for a rerun; a live submitit job's configuration is 'queued'."
    runs = tmp_path/'runs'
    atomic_write_json(runs/'toy'/'k1'/'status.json', {'state': 'running', 'pid': 2**22 + 12345, 'host': platform.node()})
    assert run_state(runs/'toy'/'k1') == 'interrupted'
    atomic_write_json(runs/'toy'/'_submitit'/'jobs.json', {'k0': {'job_id': str(os.getpid()), 'cluster': 'local', 'host': platform.node()}})
    assert run_state(runs/'toy'/'k0') == 'queued'
    plan = plan_sweep(toy, runs=runs)
    assert list(plan.action) == ['skip', 'run', 'run'] and list(plan.state) == ['queued', 'interrupted', 'new']


def test_killed_sweep_completes_only_what_is_missing(toy, tmp_path):
    "Kill a sweep process while its second configuration runs; the rerun redoes that one and runs the rest."
    runs, cfg = tmp_path/'runs', tmp_path/'toy.yaml'
    cfg.write_text(cfg.read_text().replace('k: [0, 1, -1]', 'k: [0, 1, 2]'))
    code = f"from echobook.sweeps import run_sweep; run_sweep({str(cfg)!r}, runs={str(runs)!r}, overrides={{'sleep': 4}})"
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (RunDir(runs/'toy'/'k0').state == 'done' and RunDir(runs/'toy'/'k1').state == 'running'):
            time.sleep(0.3)
        assert RunDir(runs/'toy'/'k1').state == 'running', 'the sweep did not get to its second configuration'
    finally: p.send_signal(signal.SIGKILL); p.wait()
    deadline = time.time() + 30   # the orphaned kernel notices its parent is gone and exits
    while time.time() < deadline and run_state(runs/'toy'/'k1') != 'interrupted': time.sleep(0.5)
    assert run_state(runs/'toy'/'k1') == 'interrupted'
    redo = run_sweep(cfg, runs=runs, overrides={'sleep': 4})
    assert list(redo.action) == ['skip', 'run', 'run'] and list(redo.state) == ['done'] * 3


def test_changed_parameters_are_refused_then_moved_aside(toy, tmp_path):
    runs = tmp_path/'runs'
    run_sweep(toy, runs=runs, overrides={'k': 0})
    with pytest.raises(ValueError, match='other parameters'): run_sweep(toy, runs=runs, overrides={'k': 0, 'seed': 1})
    with pytest.raises(ValueError, match='other parameters'): run_sweep(toy, 'paper', runs=runs, overrides={'k': 0})
    out = run_sweep(toy, 'paper', runs=runs, overrides={'k': 0}, overwrite=True)
    assert list(out.state) == ['done'] and len(list((runs/'toy'/'_replaced').iterdir())) == 1
    assert json.loads((runs/'toy'/'k0'/'sweep.json').read_text())['profile'] == 'paper'


def test_unknown_parameter_is_refused(toy, tmp_path):
    with pytest.raises(ValueError, match=r"unknown parameters \['epochs'\]"):
        run_sweep(toy, runs=tmp_path/'runs', overrides={'k': 0, 'epochs': 3})


def test_submitit_local_executor(toy, tmp_path):
    "The SLURM code path (AutoExecutor + map_array), run by submitit's local executor."
    runs = tmp_path/'runs'
    out = run_sweep(toy, runs=runs, executor='slurm', cluster='local', overrides={'k': [0, 1, -1]}, slurm=dict(gpus=0, cpus=1))
    assert list(out.state) == ['done', 'done', 'failed']
    jobs = json.loads((runs/'toy'/'_submitit'/'jobs.json').read_text())
    assert set(jobs) == {'k0', 'k1', 'k-1'} and all(j['cluster'] == 'local' for j in jobs.values())
    assert json.loads((runs/'toy'/'k0'/'sweep.json').read_text())['job_id'] == jobs['k0']['job_id']
    again = run_sweep(toy, runs=runs, executor='slurm', cluster='local', slurm=dict(gpus=0, cpus=1))
    assert list(again.action) == ['skip', 'skip', 'failed']


def test_entry_points(toy, tmp_path, capsys):
    "What `echobook reproduce / runs / table` call (the CLI itself is tested in its chapter)."
    runs = str(tmp_path/'runs')
    assert reproduce(str(toy), runs=runs, sets=['k=0']) == 0
    assert '1 configuration: 1 done' in capsys.readouterr().out
    assert reproduce(str(toy), runs=runs, sets=['k=[0,1]'], dry_run=True) == 0
    assert 'k0' in capsys.readouterr().out
    show_runs('toy', runs)
    assert 'k0' in capsys.readouterr().out
    assert print_table(str(toy), runs) == 0
    out = capsys.readouterr().out
    assert '| 0 |' in out and '— (not run)' in out   # k = 1 and k = -1 were not run
    with pytest.raises(ConfigError, match='available:.*table3'): reproduce('table99', runs=runs)


# --- tables and figures from synthetic run folders ---------------------------------------------------------------------

def test_table_marks_missing_cells_and_paper_column(tmp_path):
    runs = tmp_path/'runs'
    fake_runs('table3', runs, states={'mvit_v2_s.echoprime-k0-aug-mlp': 'failed', 'mvit_v2_s.echoprime-k2-aug-mlp': 'running',
                                      'panecho.panecho-k0-aug-gcn': 'new'})
    t = build_table('table3', runs)
    md = t.markdown
    assert '— (failed)' in md and '— (running)' in md and '— (not run)' in md
    assert '**93.13 ± 3.11**' in md and '<u>92.91 ± 3.08</u>' in md                  # paper group: its own best / second
    assert 'Dice ED ↑ (paper, Table 3)' in md and 'Mean shape (baseline)' in md
    data = t.data[t.data.kind == 'model']
    for m, better in [('dice_ed', max), ('mke_ed', min)]:                              # ours: best bold, second underlined
        vals = data[f'ours_{m}_mean'].dropna()
        best, second = better(vals), better(vals.drop(vals.idxmax() if better is max else vals.idxmin()))
        cells = {c['ours'][m][0]: c['ours'][m][1] for c in t.cells if c['kind'] == 'model'}
        assert [txt for txt, mk in cells.items() if mk == 'best'][0].startswith(f'{best:.2f}')
        assert [txt for txt, mk in cells.items() if mk == 'second'][0].startswith(f'{second:.2f}')
    assert data.ours_dice_ed_mean.isna().sum() == 3 and data.paper_dice_ed_mean.notna().all()
    for ext in ('csv', 'md', 'html'): assert (runs/'table3'/f'table3.{ext}').exists()
    assert '<th colspan="4">Paper (Table 3)</th>' in t.html and '<b>93.13 ± 3.11</b>' in t.html


def test_table_without_runs_shows_paper_numbers(tmp_path):
    t = build_table('table2', tmp_path/'none')
    assert t.markdown.count('— (not run)') == 16 and 'EchoNet [10]' in t.markdown
    assert not (tmp_path/'none').exists()                                              # nothing written without runs


def test_figures(tmp_path):
    runs = tmp_path/'runs'
    fake_runs('fig2', runs); fake_runs('figA1', runs)
    assert build_figure('fig2', runs).axes[0].get_xscale() == 'log'
    assert len(build_figure('figA1', runs).axes) == 8
    for name in ('fig2', 'figA1'):
        assert (runs/name/f'{name}.png').stat().st_size > 10_000
        spec, df = figure_data(name, runs)
        assert len(plotly_figure(spec, df).data) >= 2


# --- the real landmark notebook, tiny ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.learning   # a tiny-profile result (minutes): `make test-learning`, not `make test`
def test_real_landmark_sweep(tmp_path):
    "Two tiny landmark configurations and a broken one (unknown head) through the real experiment notebook."
    cfg = tmp_path/'lm.yaml'
    cfg.write_text(f'notebook: {LANDMARKS}\ngrid: {{head: [gcn, mlp, bogus]}}\n'
                   'fixed: {encoder: resnet18_2d.in1k, k: 8, augment: false, profile: tiny, pretrained: false, epochs: 1, phantom_videos: 12}\n'
                   'table: {rows: [head], columns: [dice_ed, dice_es, mke_ed, mke_es]}\n')
    runs = tmp_path/'runs'
    out = run_sweep(cfg, runs=runs)
    assert list(out.state) == ['done', 'done', 'failed'], out.error.tolist()
    assert 'must be mlp or gcn' in out.error[2] and 'bogus' in out.error[2]
    for rd in out.run_dir[:2]:
        for f in ('config.json', 'env.json', 'metrics.json', 'predictions.csv', 'per_video.csv', 'log.csv', 'notebook.ipynb'):
            assert (Path(rd)/f).exists(), f
    assert (runs/'_data'/'phantom-v2-12'/'FileList.csv').exists()                        # one shared phantom
    assert list(run_sweep(cfg, runs=runs).action) == ['skip', 'skip', 'failed']
    res = collect_results(cfg, runs)
    assert res['model/dice_ed/mean'].notna().sum() == 2
    assert '— (failed)' in build_table(cfg, runs).markdown


# --- the paper path, typed parameters, tables that show every run ------------------------------------------------------

def test_paper_without_data_stops_before_any_work(tmp_path):
    "`reproduce --profile paper` without `--data` raises before a run folder or phantom is written (unless allow_phantom)."
    runs = tmp_path/'runs'
    for table in ('table3', 'ef_echoapex', 'dfkd_table1', 'probing_table3'):
        with pytest.raises(ConfigError, match="'paper' profile needs the real data"): reproduce(table, 'paper', runs=runs)
        with pytest.raises(ConfigError, match='folder not found'): run_sweep(table, 'paper', data=tmp_path/'nope', runs=runs)
    assert not runs.exists()
    plan = plan_sweep('table3', 'paper', runs=runs, allow_phantom=True)               # the explicit smoke test is allowed
    assert len(plan) == 20 and plan.params[0]['data_dir'].endswith('phantom-v2-160') and not runs.exists()
    plan = plan_sweep('table3', 'paper', data=tmp_path, runs=runs)
    assert plan.params[0]['data_dir'] == str(tmp_path.absolute())


@pytest.mark.parametrize('table', list_tables())
def test_paper_profiles_use_pretrained_weights(table):
    "Every experiment notebook that has `pretrained` gets True under the paper profile (except encoders without weights)."
    cfg = load_table_config(table)
    configs = expand_grid(cfg, 'paper')
    if 'pretrained' not in check_parameters(notebook_path(cfg), configs[:1])[0].params: return   # e.g. ef_videomae: no such parameter
    explicit_off = [v for vs in cfg['grid'].values() for v in vs if isinstance(v, dict) and v.get('pretrained') is False]
    for c in configs:
        assert c.params['pretrained'] is True or any(all(c.params.get(k) == x for k, x in v.items()) for v in explicit_off), c.id


def test_set_values_are_typed(toy, tmp_path):
    "`--set augment=false` (or a papermill-style string) reaches the notebook as the bool False."
    plan = plan_sweep(toy, runs=tmp_path/'runs', overrides={'k': 0, 'augment': 'false', 'seed': '2'})
    assert plan.params[0]['augment'] is False and plan.params[0]['seed'] == 2
    with pytest.raises(ConfigError, match="augment='perhaps'"): plan_sweep(toy, runs=tmp_path/'runs', overrides={'augment': 'perhaps'})


def test_corrupt_run_folder_is_named_and_the_rest_shown(tmp_path, capsys):
    runs = tmp_path/'runs'
    fake_runs('table4', runs)
    bad = runs/'table4'/'k2-mvit_v2_s.k400'
    (bad/'metrics.json').write_text('{"summary": {"model/dice_ed/mean": 0.9')    # truncated
    t = build_table('table4', runs)
    data = t.data[t.data.kind == 'model'].set_index('id')
    assert data.loc['k2-mvit_v2_s.k400', 'state'] == 'unreadable' and '— (unreadable)' in t.markdown
    assert data.drop('k2-mvit_v2_s.k400').ours_dice_ed_mean.notna().all() and len(data) == 8
    assert any('k2-mvit_v2_s.k400/metrics.json' in n and 'corrupt JSON' in n for n in t.notes)
    assert 'k2-mvit_v2_s.k400/metrics.json' in t.markdown and 'k2-mvit_v2_s.k400/metrics.json' in t.html
    listing = list_runs('table4', runs).set_index('id')
    assert listing.loc['k2-mvit_v2_s.k400', 'state'] == 'unreadable' and (listing.state == 'done').sum() == 7
    (runs/'table4'/'k0-mvit_v2_s.k400'/'status.json').write_text('not json')         # a corrupt status too
    assert print_table('table4', runs) == 0 and 'k0-mvit_v2_s.k400/status.json' in capsys.readouterr().out


def test_tiny_row_outside_the_paper_grid_is_shown(tmp_path):
    "EF (paper 001): the tiny profile's random-init ResNet-18 is not a paper configuration; its finished run still appears."
    runs = tmp_path/'runs'
    cfg = load_table_config('ef_echoapex')
    tiny = {c.id: c for c in expand_grid(cfg, 'tiny')}
    rd = runs/'ef_echoapex'/'resnet18_2d.in1k-nopre'
    assert 'resnet18_2d.in1k-nopre' in tiny and 'resnet18_2d.in1k-nopre' not in {c.id for c in expand_grid(cfg, 'paper')}
    atomic_write_json(rd/'sweep.json', dict(table='ef_echoapex', profile='tiny', grid=tiny['resnet18_2d.in1k-nopre'].grid,
                                            params=tiny['resnet18_2d.in1k-nopre'].params))
    atomic_write_json(rd/'metrics.json', dict(summary={'model/mae/mean': 8.68, 'model/mae/std': 6.1, 'mean/mae/mean': 9.9}))
    atomic_write_json(rd/'status.json', dict(state='done'))
    t = build_table('ef_echoapex', runs)
    row = t.data.set_index('id').loc['resnet18_2d.in1k-nopre']
    assert row.kind == 'model' and row.ours_mae_mean == 8.68 and pd.isna(row.paper_mae_mean)
    assert '8.68 ± 6.10' in t.markdown and 'ResNet-18 IN-1k †' in t.markdown and any('tiny profile' in n for n in t.notes)
    paper = t.data.set_index('id').loc['vit_small_patch8_224.dino-pre']                # the paper row keeps its quoted cell
    assert paper.paper_mae_mean == 6.1 and paper.state == 'new'
    assert 'Training-mean EF (baseline)' in t.markdown


def test_every_config_prints_a_table(tmp_path, capsys):
    "`echobook table` prints a table for every config, probing included (not file paths)."
    for name in list_tables():
        assert print_table(name, tmp_path/'none') == 0
        out = capsys.readouterr().out
        assert out.count('\n|') >= 3 and '— (not run)' in out, name
    assert print_table('probing_table3', tmp_path/'none') == 0
    assert 'T2 image ↑ (paper, Table 3)' in (out := capsys.readouterr().out) and '85.60' in out and 'MedImageInsight' in out
