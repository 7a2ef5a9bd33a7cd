"""Every chapter in nbs/ runs top to bottom (the same check as `nbdev_test`, reported through pytest); the tutorials are
executed by tests/test_tutorials.py (`heavy`) and the experiment notebooks by the task tests."""
from pathlib import Path
import os, pytest

NBS = Path(__file__).parents[1]/'nbs'
SKIP_FLAGS = ('slow', 'cuda', 'weights')  # cells carrying these test flags are skipped, as in nbdev_test
notebooks = sorted(p for p in NBS.rglob('*.ipynb') if not p.name.startswith('_') and not {'.ipynb_checkpoints', 'experiments', 'tutorials'} & set(p.parts))


@pytest.mark.notebook
@pytest.mark.parametrize('nb', notebooks, ids=[str(p.relative_to(NBS)) for p in notebooks])
def test_notebook_runs(nb, monkeypatch):
    from nbdev.test import test_nb
    monkeypatch.chdir(nb.parent)
    ok, secs = test_nb(nb, skip_flags=list(SKIP_FLAGS), force_flags=[], do_print=False, showerr=True, basepath=NBS.parent)
    assert ok, f'{nb.name} failed (run it in Jupyter to see the cell)'
