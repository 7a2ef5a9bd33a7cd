"""The offline book preview (`echobook docs --preview`) and the video viewer's figure functions."""
from pathlib import Path
import numpy as np, pandas as pd
import pytest

from echobook.docs import build_preview, sidebar_sections
from echobook.viewer import load_predictions, area_curve, view_figure
from echobook.data.echonet import scan_dataset, read_video
from echobook.cli import main

NBS = Path(__file__).parents[1]/'nbs'


SECTIONS = ('Tutorials', 'Core', 'Data', 'Models', 'Evaluation & runs', 'Training', 'Tasks', 'Sweeps & tables', 'CLI & tools',
            'Experiments', 'Results', 'Deviations & citing')


def test_sidebar_follows_quarto_sections():
    "The sidebar groups the chapters as the architecture: every notebook is in one section, in dependency order."
    secs = dict(sidebar_sections(NBS))
    assert [s for s in secs if s] == list(SECTIONS)                       # no 'Other': nothing left out
    assert [p.name for p in secs['Core']][:2] == ['00_core.ipynb', '00a_config.ipynb']
    assert {p.name for p in secs['CLI & tools']} >= {'09_docs.ipynb', '10_bench.measure.ipynb', '11_cli.ipynb'}
    assert any(p.name == 'landmarks.ipynb' for p in secs['Experiments'])
    assert all(p.parent.name == 'results' for p in secs['Results'])
    assert all(p.parent.name == 'tutorials' for p in secs['Tutorials']) and len(secs['Tutorials']) == 4
    assert 'cite.ipynb' in {p.name for p in secs['Deviations & citing']}
    chapters = [p.name for s in SECTIONS[1:-3] for p in secs[s]]
    assert chapters == sorted(chapters)                                    # section order is notebook order
    listed = {p for ps in secs.values() for p in ps}
    assert {p for p in NBS.rglob('*.ipynb') if not p.name.startswith('_') and '.ipynb_checkpoints' not in p.parts} == listed


def test_preview_pages(tmp_path):
    "A preview of real notebooks (a few, for time): pages mirror nbs/, the index follows the sidebar sections."
    q = tmp_path/'_quarto.yml'
    q.write_text('website:\n  sidebar:\n    contents:\n      - index.ipynb\n      - section: Experiments\n        contents:\n'
                 '          - auto: "experiments/landmarks.ipynb"\n      - section: Results\n        contents:\n'
                 '          - auto: "results/table3.ipynb"\n      - section: Sweeps & tables\n        contents:\n          - auto: "07*.ipynb"\n')
    out = tmp_path/'preview'
    index = build_preview(NBS, out, quarto=q, others=False, progress=False)   # executes results/table3 (reads runs/ only)
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*.html')) == [
        '07_sweeps.html', 'experiments/landmarks.html', 'home.html', 'index.html', 'results/table3.html']
    html = index.read_text()
    assert html.index('<h2>Experiments</h2>') < html.index('<h2>Results</h2>') < html.index('<h2>Sweeps &amp; tables</h2>')
    assert 'href="experiments/landmarks.html"' in html and 'href="results/table3.html"' in html
    sweeps = (out/'07_sweeps.html').read_text()
    assert 'Sweeps' in sweeps and 'href="index.html"' in sweeps and '#| export' not in sweeps
    t3 = (out/'results'/'table3.html').read_text()
    assert 'href="../index.html"' in t3 and 'Paper (Table 3)' in t3               # executed: the rebuilt table is on the page


def test_docs_cli(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr('echobook.docs.build_preview', lambda **kw: seen.update(kw) or tmp_path/'index.html')
    assert main(['docs', '--preview', '--out', str(tmp_path), '--no-execute']) == 0
    assert seen['out'] == str(tmp_path) and seen['execute'] == () and 'preview:' in capsys.readouterr().out


def test_docs_without_quarto_says_so(monkeypatch, capsys):
    monkeypatch.setattr('shutil.which', lambda name: None)
    assert main(['docs']) == 2
    assert '--preview' in capsys.readouterr().err


def test_viewer_figures(phantom_dir, tmp_path):
    recs = scan_dataset(phantom_dir, check_videos=False).records[:3]
    rows = [dict(FileName=r.FileName, phase=ph, point=i, x=x + 0.5, y=y) for r in recs
            for ph, kp in [('ED', r.ed_kpts), ('ES', r.es_kpts)] for i, (x, y) in enumerate(kp)]
    pd.DataFrame(rows).to_csv(tmp_path/'predictions.csv', index=False)
    preds = load_predictions(tmp_path)
    rec = recs[0]
    np.testing.assert_allclose(preds[rec.FileName][0], rec.ed_kpts + [0.5, 0])
    video = read_video(rec.path)
    areas, what = area_curve(rec, video)
    assert what == 'true area (phantom)' and len(areas) == len(video) and areas[rec.ed_frame] > areas[rec.es_frame]
    fig = view_figure(video, rec, rec.es_frame, areas, what, preds[rec.FileName])
    left, right = fig.axes
    assert '(ES)' in left.get_title() and len(left.lines) == 4            # traced and predicted, at ED and ES
    assert right.get_ylabel().startswith('LV cavity area')
    with pytest.raises(FileNotFoundError, match='no predictions'): load_predictions(tmp_path/'nothing')
