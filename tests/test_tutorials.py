"""The tutorials (nbs/tutorials/): committed executed, with their outputs, no error and no machine paths, listed in the
sidebar; executing them all again is `slow` (minutes: each trains a tiny model on the phantom)."""
import json, os, re, subprocess, sys, time
from pathlib import Path
import pytest

NBS = Path(__file__).parents[1]/'nbs'
TUTORIALS = sorted((NBS/'tutorials').glob('*.ipynb'))
EXPECTED = ['real_echonet_slurm', 'bring_your_own_data', 'add_an_encoder', 'add_a_task']   # issue 17's four
_MACHINE_PATH = re.compile(r'(/tmp/|/root/|/home/\w+/|/work/)')
ids = [p.stem for p in TUTORIALS]


def _cells(nb) -> list[dict]:
    return json.loads(Path(nb).read_text())['cells']

def _text(o) -> str:
    "The text of one output: a stream, or the text/plain, text/html and text/markdown of a result."
    t = o.get('text') if o['output_type'] == 'stream' else {k: v for k, v in (o.get('data') or {}).items() if k.startswith('text/')}
    return json.dumps(t)

def problems(nb) -> list[str]:
    "What keeps notebook `nb` from being a committed, executed tutorial: missing outputs, errors, machine paths."
    code = [c for c in _cells(nb) if c['cell_type'] == 'code']
    outs = [o for c in code for o in c.get('outputs', [])]
    found = []
    if sum(bool(c.get('outputs')) for c in code) < 0.6 * len(code): found.append('fewer than 60 % of the code cells have outputs (save it executed: echobook.docs.execute_notebook)')
    if not any({'text/html', 'image/png'} & set(o.get('data') or {}) for o in outs): found.append('no table or figure among the outputs')
    found += [f"error output: {o.get('ename')}: {o.get('evalue')}" for o in outs if o['output_type'] == 'error']
    found += [f'traceback printed: {_text(o)[:200]}' for o in outs if 'Traceback (most recent call last)' in _text(o)]
    found += [f'machine path in an output: {m.group(0)}… in {_text(o)[:120]}' for o in outs for m in [_MACHINE_PATH.search(_text(o))] if m]
    return found


def test_problems_finds_what_it_should(tmp_path):
    "`problems` flags a notebook without outputs, with an error output, and with a temporary path in an output."
    code = lambda *outs: dict(cell_type='code', source='x', metadata={}, outputs=list(outs), execution_count=None)
    def nb(*cells):
        (tmp_path/'t.ipynb').write_text(json.dumps(dict(cells=list(cells))))
        return tmp_path/'t.ipynb'
    table = dict(output_type='execute_result', data={'text/html': '<table></table>', 'text/plain': 'x'}, metadata={})
    assert problems(nb(code(table), code(dict(output_type='stream', name='stdout', text='ok')))) == []
    assert any('60 %' in p for p in problems(nb(code(table), code(), code())))
    assert any('error output' in p for p in problems(nb(code(table, dict(output_type='error', ename='E', evalue='v', traceback=[])))))
    assert any('machine path' in p for p in problems(nb(code(table, dict(output_type='stream', name='stdout', text='/tmp/tmpab12/x')))))


def test_the_four_tutorials_exist():
    assert [n for n in EXPECTED if n not in ids] == [], f'missing tutorials in nbs/tutorials/: {set(EXPECTED) - set(ids)}'


@pytest.mark.parametrize('nb', TUTORIALS, ids=ids)
def test_committed_executed(nb):
    "Each tutorial is committed with its outputs (a table or figure among them), no error, no machine path, < 400 kB."
    assert not problems(nb), f'{nb.relative_to(NBS)}: ' + '; '.join(problems(nb))
    assert nb.stat().st_size < 400_000, f'{nb.relative_to(NBS)}: {nb.stat().st_size // 1000} kB (keep outputs small)'


def test_tutorials_in_sidebar():
    "The sidebar has a Tutorials section listing every tutorial."
    from echobook.docs import sidebar_sections
    section = dict(sidebar_sections(NBS, others=False)).get('Tutorials', [])
    assert sorted(section) == TUTORIALS, f'nbs/_quarto.yml: the Tutorials section lists {[p.name for p in section]}'


_RUN = '''import sys, time
from execnb.shell import CaptureShell
t = time.time(); CaptureShell(sys.argv[1]).execute(sys.argv[1], sys.argv[2], exc_stop=True); print(f"{time.time() - t:.0f}")'''

@pytest.mark.heavy
@pytest.mark.timeout(3600)
def test_tutorials_execute(tmp_path):
    "Every tutorial runs top to bottom in a fresh process (a copy is executed; the committed notebook is untouched)."
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'NO_ALBUMENTATIONS_UPDATE': '1'}
    times, failed = {}, []
    for nb in TUTORIALS:
        out = tmp_path/nb.name
        r = subprocess.run([sys.executable, '-c', _RUN, str(nb), str(out)], cwd=nb.parent, env=env, capture_output=True, text=True)
        if r.returncode or not out.exists(): failed.append(f'{nb.name}: {r.stderr[-2000:]}'); continue
        times[nb.stem] = r.stdout.strip().splitlines()[-1]
        errs = [p for p in problems(out) if p.startswith(('error', 'traceback'))]
        if errs: failed.append(f'{nb.name}: {errs}')
    print('tutorial run times (s):', times)
    assert not failed, '\n'.join(failed)
