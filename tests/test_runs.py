"""Run folders: overwrite starts from scratch, finished or other-config runs are refused, attempts are recorded."""
import json
import pytest

from echobook.core import ConfigError, EchobookDataError, EchobookError
from echobook.runs import RunDir, fail_run, finish_run, run_context, run_id, start_run


def _finished(folder, config):
    "A finished run with checkpoints, a log and metrics, as a training notebook leaves it."
    run = start_run(folder, config)
    for name in ('last.pth', 'checkpoint.pth', 'best.pth'): run.file(name).write_bytes(b'old weights')
    run.file('log.csv').write_text('epoch,train_loss\n0,1.0\n')
    finish_run(run, {'dice': 0.5})
    return run


def test_overwrite_moves_the_old_run_aside_and_starts_empty(tmp_path):
    _finished(tmp_path/'run', {'lr': 1e-3, 'epochs': 2})
    run = start_run(tmp_path/'run', {'lr': 1e-4, 'epochs': 5}, overwrite=True)
    assert sorted(p.name for p in run.path.iterdir()) == ['attempts.jsonl', 'config.json', 'env.json', 'status.json']
    assert run.read('config.json') == {'lr': 1e-4, 'epochs': 5} and run.state == 'running' and len(run.attempts) == 1
    aside, = tmp_path.glob('run.replaced-*')
    assert {'last.pth', 'checkpoint.pth', 'best.pth', 'log.csv', 'metrics.json'} <= {p.name for p in aside.iterdir()}
    assert RunDir(aside).state == 'done' and RunDir(aside).read('config.json') == {'lr': 1e-3, 'epochs': 2}


def test_overwrite_twice_keeps_both_old_runs(tmp_path):
    _finished(tmp_path/'run', {'lr': 1})
    finish_run(start_run(tmp_path/'run', {'lr': 2}, overwrite=True), {'dice': 0.6})
    start_run(tmp_path/'run', {'lr': 3}, overwrite=True)
    assert sorted(RunDir(p).read('config.json')['lr'] for p in tmp_path.glob('run.replaced-*')) == [1, 2]


def test_finished_run_same_config_is_refused(tmp_path):
    _finished(tmp_path/'run', {'lr': 1e-3})
    with pytest.raises(FileExistsError, match=str(tmp_path/'run')):
        start_run(tmp_path/'run', {'lr': 1e-3})


def test_other_config_is_refused_naming_the_keys(tmp_path):
    run = start_run(tmp_path/'run', {'lr': 1e-3, 'epochs': 2, 'k': 8})
    fail_run(run, 'killed')
    with pytest.raises(ConfigError, match=r'config.json.*epochs: 2 → 5, lr: 0.001 → 0.0001') as e:
        start_run(tmp_path/'run', {'lr': 1e-4, 'epochs': 5, 'k': 8})
    assert "'k'" not in str(e.value) and 'k:' not in str(e.value)
    assert RunDir(tmp_path/'run').read('config.json')['lr'] == 1e-3      # nothing was written


def test_attempts_are_appended_and_env_kept(tmp_path):
    run = start_run(tmp_path/'run', {'lr': 1})
    fail_run(run, 'killed')
    env = run.file('env.json').read_text()
    status = json.loads(run.file('status.json').read_text())
    start_run(tmp_path/'run', {'lr': 1})                                  # resume after a failure: same config
    a = run.attempts
    assert [x['attempt'] for x in a] == [1, 2] and all(x['code_version'] and x['config_hash'] for x in a)
    assert run.file('env.json').read_text() == env
    assert run.status['failed_at'] == status['failed_at'] and run.state == 'running'


def test_resume_across_commits_is_visible(tmp_path, monkeypatch):
    import echobook.runs as runs_mod, echobook.core as core
    start_run(tmp_path/'run', {'lr': 1})
    real = core.environment_info
    monkeypatch.setattr(runs_mod, 'environment_info', lambda: {**real(), 'code_version': 'another-commit'})
    fail_run(RunDir(tmp_path/'run'), 'timeout')
    run = start_run(tmp_path/'run', {'lr': 1})
    versions = [a['code_version'] for a in run.attempts]
    assert len(set(versions)) == 2 and versions[-1] == 'another-commit'


def test_fail_marks_failed_with_the_message(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_context(tmp_path/'run', {'k': 1}): 1 / 0
    run = RunDir(tmp_path/'run')
    assert run.state == 'failed' and run.status['error'] == 'ZeroDivisionError: division by zero'
    with run_context(tmp_path/'ok', {'k': 1}) as r: finish_run(r, {'x': 1})
    assert r.state == 'done' and r.read('metrics.json') == {'x': 1}


def test_corrupt_json_names_the_file(tmp_path):
    finish_run(start_run(tmp_path/'run', {'k': 1}), {'x': 1})
    (tmp_path/'run'/'metrics.json').write_text('{"x": 1,')
    with pytest.raises(EchobookDataError, match=r'run/metrics.json: corrupt JSON') as e:
        RunDir(tmp_path/'run').read('metrics.json')
    assert isinstance(e.value, EchobookError)
    (tmp_path/'run'/'status.json').write_text('')
    with pytest.raises(EchobookError, match='status.json'): start_run(tmp_path/'run', {'k': 1})
    assert start_run(tmp_path/'run', {'k': 1}, overwrite=True).state == 'running'   # overwrite replaces it


def test_run_id_changes_with_any_parameter():
    c = dict(encoder='resnet18_2d.in1k', k=16, head='gcn', lr=5e-4, epochs=10, size=224)
    ids = {run_id({**c, **d}, ['encoder', 'k', 'head']) for d in [{}, {'lr': 1e-4}, {'epochs': 20}, {'size': 112}]}
    assert len(ids) == 4 and all(i.startswith('resnet18_2d.in1k-k16-gcn-h') and len(i.split('-h')[-1]) == 6 for i in ids)
    assert run_id(c, ['k']) == run_id(dict(sorted(c.items())), ['k'])
