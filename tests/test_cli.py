"""The `echobook` command: fast and lazy help, every subcommand's options, dataset kinds, clear errors, no FutureWarnings."""
from pathlib import Path
import os, re, subprocess, sys, time
import pytest

from echobook.cli import COMMANDS, RENAMED, main

ROOT = Path(__file__).parents[1]
ECHOBOOK = Path(sys.executable).parent/'echobook'
HEAVY = ('torch', 'pandas', 'numpy', 'fastai', 'timm')


def _run(*args, env=None, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, 'PYTHONWARNINGS': '', **(env or {})}, **kw)


def test_import_is_lazy():
    "Importing the CLI imports no chapter and no heavy library: commands import what they need when they run."
    code = f"import echobook.cli, sys; print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('echobook.') and m != 'echobook.cli'])"
    r = _run(sys.executable, '-c', code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[]', r.stdout


def test_help_is_fast():
    "`echobook --help` answers in under 1.5 s (best of 3; with a margin for a loaded machine) and prints no FutureWarning."
    times = []
    for _ in range(3):
        t = time.perf_counter(); r = _run(ECHOBOOK, '--help'); times.append(time.perf_counter() - t)
        assert r.returncode == 0 and 'usage: echobook' in r.stdout, r.stderr
        assert 'Warning' not in r.stderr, r.stderr
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    assert min(times) < 1.5 * max(1.0, min(load, 2.0)), (times, load)


def test_every_subcommand_has_help(capsys):
    from echobook.cli import command_options
    for name, fn in COMMANDS.items():
        assert main([name, '--help']) == 0, name
        assert capsys.readouterr().out.startswith(f'usage: echobook {name}')
        assert fn.__doc__ and all(kw['help'] for _, kw in command_options(fn)), f'{name}: an option without its docment'
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_readme_commands_parse():
    "The commands of the README parse (without running)."
    from echobook.cli import build_parser
    p = build_parser()
    for line in ['demo', 'demo --encoder resnet18_2d.in1k --k 8', 'phantom OUT --videos 100 --seed 0 --domain echonet',
                 'inspect /data/EchoNet-Dynamic', 'inspect /data/EchoNet-Dynamic --json', 'prepare DATA CACHE --workers 8',
                 'reproduce table3 --profile tiny', 'reproduce table3 --profile paper --data D --executor slurm --partition gpu',
                 'runs table3', 'table table3', 'table probing_table3', 'docs --preview', 'bench', 'bench --device cuda',
                 'phantom OUT --kind views', 'phantom OUT --kind camus', 'inspect D --kind camus', 'prepare D C --kind views']:
        ns = p.parse_args(line.split())
        assert callable(ns._fn), line


def test_renamed_commands_say_so(capsys):
    for old, new in RENAMED.items():
        assert main([old, 'x']) == 2
        assert f'echobook {new}' in capsys.readouterr().err


def test_unknown_kind_errors_clearly(tmp_path, capsys):
    assert main(['inspect', str(tmp_path), '--kind', 'dicom']) == 2
    assert "invalid choice: 'dicom'" in capsys.readouterr().err
    (tmp_path/'notes.txt').write_text('not a dataset')
    assert main(['inspect', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'cannot tell the dataset kind' in err and '--kind' in err and str(tmp_path) in err
    assert main(['prepare', str(tmp_path/'nowhere'), str(tmp_path/'c')]) == 2
    assert 'nowhere: dataset folder not found' in capsys.readouterr().err
    from echobook.data.kinds import dataset_kind
    with pytest.raises(ValueError, match="unknown dataset kind 'dicom'"): dataset_kind(tmp_path, 'dicom')


def test_kind_is_detected(phantom_dir, tmp_path, capsys):
    "inspect detects EchoNet-Dynamic; a CAMUS-layout copy of it is detected as CAMUS."
    from echobook.data.camus import write_camus_like
    assert main(['inspect', str(phantom_dir), '--no-video-check']) == 0
    assert 'usable videos' in capsys.readouterr().out
    write_camus_like(phantom_dir, tmp_path/'camus', n_patients=2)
    assert main(['inspect', str(tmp_path/'camus')]) == 0
    assert '2 patients' in capsys.readouterr().out
    assert main(['prepare', str(tmp_path/'camus'), str(tmp_path/'cache')]) == 2
    assert 'nothing to prepare' in capsys.readouterr().err


def test_paper_profile_needs_data(tmp_path):
    "`reproduce --profile paper` without --data stops before any work: exit 2, a message naming --data, no run folder."
    runs = tmp_path/'runs'
    r = _run(ECHOBOOK, 'reproduce', 'table3', '--profile', 'paper', '--runs', runs, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert '--data' in r.stderr and '--allow-phantom' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not runs.exists() or not any(runs.rglob('*')), sorted(runs.rglob('*'))


def test_allow_phantom_reaches_the_sweep(monkeypatch):
    seen = {}
    monkeypatch.setattr('echobook.sweeps.reproduce', lambda table, **kw: seen.update(kw, table=table) or 0)
    assert main(['reproduce', 'table3', '--profile', 'paper', '--allow-phantom', '--set', 'k=0', '--set', 'head=gcn', '--time', '30']) == 0
    assert seen['table'] == 'table3' and seen['allow_phantom'] is True and seen['profile'] == 'paper'
    assert seen['sets'] == ['k=0', 'head=gcn'] and seen['slurm'] == {'time_min': 30} and seen['wait'] is None


def test_library_future_warnings_are_hidden(tmp_path):
    "A library's FutureWarning raised while a command runs is not printed, here or in the Python processes it starts."
    (tmp_path/'oldlib.py').write_text("import warnings\nwarnings.warn('oldlib.thing is deprecated', FutureWarning)\n")
    code = ("import subprocess, sys\nfrom echobook import cli\n"
            "@cli.command\ndef cmd_probe():\n    'Import a library that warns, here and in a child process.'\n"
            "    import oldlib\n    subprocess.run([sys.executable, '-c', 'import oldlib'], check=True)\n"
            "sys.exit(cli.main(['probe']))\n")
    r = _run(sys.executable, '-c', code, env={'PYTHONPATH': f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 0, r.stderr
    assert 'FutureWarning' not in r.stderr, r.stderr
    r = _run(sys.executable, '-c', 'import oldlib', env={'PYTHONPATH': str(tmp_path)})
    assert 'FutureWarning' in r.stderr                                # the probe can fail: without the CLI it warns


def test_no_module_imports_the_cli():
    "The CLI sits on top: no other module imports it (commands are declared in echobook.cli only)."
    pkg = ROOT/'echobook'
    bad = [str(p.relative_to(pkg)) for p in pkg.rglob('*.py') if p.name not in ('cli.py', '_modidx.py')
           and re.search(r'^\s*(from|import)\s+(echobook\.cli|\.+cli)\b', p.read_text(), re.M)]
    assert not bad, f'modules importing echobook.cli: {bad}'


def test_every_command_finds_what_it_calls():
    "The functions the commands import when they run exist where they are imported from (the chapters' APIs)."
    import ast, importlib, inspect
    import echobook.cli as cli
    missing = []
    for node in ast.walk(ast.parse(inspect.getsource(cli))):
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('echobook'):
            mod = importlib.import_module(node.module)
            missing += [f'{node.module}.{a.name}' for a in node.names if not hasattr(mod, a.name)]
    assert not missing, missing


def test_table_prints_the_deviations(tmp_path, capsys):
    "`echobook table table3` prints the paper's numbers, then every deviation of paper 000 that applies to Table 3."
    from echobook.tables import table_deviations
    assert main(['table', 'table3', '--runs', str(tmp_path/'runs')]) == 0
    out = capsys.readouterr().out
    devs = table_deviations('table3')
    assert devs and 'Deviations from the paper' in out and out.index('Deviations from the paper') > out.index('93.13 ± 3.11')
    for d in devs: assert d['what'] in out and d['switch'].split()[0] in out
    assert 'EchoNet baseline not run' not in out                     # an entry of Table 2 only


def test_dfkd_complexity_reports_the_reference_student(capsys):
    "Paper 004, Table 2: the best student (B, l) = (4, 1) has 0.72 M parameters; the CLI's default is that student."
    assert main(['dfkd-complexity', '--sizes', '56']) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines()]
    params = {(int(r[0]), int(r[1])): int(r[2]) for r in rows[1:]}
    assert abs(params[(4, 1)] - 0.72e6) / 0.72e6 < 0.015, params[(4, 1)]
    assert main(['dfkd-complexity', '--sizes', '56', '--skips', '--relu', '--residual', 'none']) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines()]
    assert int(rows[1:][12][2]) > params[(4, 1)]   # the U-Net variant of (4, 1) is larger


def test_gpu_check_calls_the_bench(monkeypatch, tmp_path, capsys):
    "`echobook gpu-check --device cpu --reduced --out DIR` calls echobook.bench.gpu_check.gpu_check(device, out, reduced)."
    import echobook.bench.gpu_check as gc
    calls = []
    monkeypatch.setattr(gc, 'gpu_check', lambda device, out, reduced: calls.append((device, out, reduced)) or Path(out)/'report.md')
    assert main(['gpu-check', '--device', 'cpu', '--reduced', '--out', str(tmp_path)]) == 0
    assert calls == [('cpu', str(tmp_path), True)] and 'report.md' in capsys.readouterr().out


def test_reproduce_smoke_and_dry_run_options(monkeypatch):
    "--smoke / --steps / --limit / --device / --max-batch reach `reproduce`; --smoke needs --profile paper."
    import echobook.sweeps as sw
    seen = {}
    monkeypatch.setattr(sw, 'reproduce', lambda table, **kw: seen.update(kw, table=table) or 0)
    assert main(['reproduce', 'table3', '--profile', 'paper', '--smoke', '--steps', '2', '--limit', '1', '--device', 'cpu']) == 0
    assert (seen['table'], seen['smoke'], seen['steps'], seen['limit'], seen['device'], seen['max_batch']) == ('table3', True, 2, 1, 'cpu', None)
    monkeypatch.undo()
    assert main(['reproduce', 'table3', '--smoke']) == 2          # tiny profile: a user error, one line
