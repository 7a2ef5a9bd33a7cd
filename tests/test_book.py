"""The book as a reader sees it: one generated results page per config, no typed numbers on them, and the offline
preview (every chapter shows a figure or a table, every page is listed, no dead link)."""
import re, time
from pathlib import Path
import nbformat, pytest

from echobook.config import list_tables, load_table_config
from echobook.tables import table_citation
from echobook.results import results_page
from echobook.docs import build_preview, dead_links, shows_output, sidebar_sections

NBS = Path(__file__).parents[1]/'nbs'
_NUMBER = re.compile(r'\d+\.\d+|\d+\s*%')   # a typed result: a decimal number or a percentage


def test_every_config_has_its_generated_page():
    "nbs/results/ holds exactly one page per config, each equal (cell by cell) to what its generator writes."
    assert {p.stem for p in (NBS/'results').glob('*.ipynb')} == set(list_tables())
    for name in list_tables():
        page = nbformat.read(NBS/'results'/f'{name}.ipynb', as_version=4)
        assert [(c.cell_type, c.source) for c in page.cells] == [(c.cell_type, c.source) for c in results_page(name).cells], \
            f'nbs/results/{name}.ipynb is not what echobook.results.write_results_pages writes: regenerate it (make book)'


def _quoted(name) -> list[str]:
    "Text a page may carry from configs/: the config's title and its citation's paper, source and caption."
    cfg = load_table_config(name)
    cit = table_citation(cfg) if cfg.get('cite') else None
    return [s for s in [cfg.get('title'), *((cit or {}).get(k) for k in ('paper', 'source', 'caption'))] if s]


def _typed_numbers(text, quoted) -> list[str]:
    for q in sorted(quoted, key=len, reverse=True): text = text.replace(q, '')
    return _NUMBER.findall(text)


def test_no_typed_numbers_in_results_pages():
    "No markdown cell of nbs/results/ states a number (quoted config text aside): numbers are computed outputs."
    assert _typed_numbers('beat the mean shape (91.42 vs 81.65, 95 % CI)', []) == ['91.42', '81.65', '95 %']
    assert _typed_numbers('Table 4: limited data (10 %)', ['Table 4: limited data (10 %)']) == []
    for p in sorted((NBS/'results').glob('*.ipynb')):
        quoted = _quoted(p.stem)
        for c in nbformat.read(p, as_version=4).cells:
            if c.cell_type == 'markdown': assert not _typed_numbers(c.source, quoted), f'{p}: typed number(s) in a markdown cell: {c.source[:200]!r}'


def _html(out, nb) -> Path:
    rel = nb.relative_to(NBS)
    return out/('home.html' if rel == Path('index.ipynb') else rel.with_suffix('.html'))


@pytest.fixture(scope='module')
def preview(tmp_path_factory):
    "The whole offline preview with the saved outputs, as a reader sees it (built once for the tests below)."
    t = time.time()
    index = build_preview(NBS, tmp_path_factory.mktemp('book')/'preview', execute=(), progress=False)
    print(f'preview: {time.time() - t:.0f} s')
    return index.parent


@pytest.mark.slow
def test_preview_lists_every_page(preview):
    "Every notebook of nbs/ has its page, listed by the preview's index and by the book's own index (home)."
    pages = [p for _, ps in sidebar_sections(NBS) for p in ps]
    assert {p for p in NBS.rglob('*.ipynb') if not p.name.startswith('_') and '.ipynb_checkpoints' not in p.parts} == set(pages)
    assert all(_html(preview, p).exists() for p in pages)
    home, index = _html(preview, NBS/'index.ipynb').read_text(), (preview/'index.html').read_text()
    for p in pages:
        if p == NBS/'index.ipynb': continue
        href = f'href="{_html(preview, p).relative_to(preview).as_posix()}"'
        assert href in index and href in home, f'{p.relative_to(NBS)} is not listed'


@pytest.mark.slow
def test_chapters_show_outputs(preview):
    "Every chapter (nbs/*.ipynb) shows at least one figure or table among its outputs, not only code."
    bare = [p.name for p in sorted(NBS.glob('*.ipynb')) if not p.name.startswith('_') and not shows_output(_html(preview, p).read_text())]
    assert not bare, f'chapter pages without any figure or table output (execute them and commit their outputs): {bare}'


@pytest.mark.slow
def test_results_pages_in_preview(preview):
    "Every config has its results page with the rebuilt table, and the figure where the paper has one and runs exist."
    for name in list_tables():
        cfg, html = load_table_config(name), _html(preview, NBS/'results'/f'{name}.ipynb').read_text()
        assert 'class="echobook-table"' in html, f'results/{name}: no table'
        if (cfg.get('figure') or (cfg.get('probing') or {}).get('figure')) and 'No runs yet' not in html:
            assert '<img' in html, f'results/{name}: runs but no figure'


@pytest.mark.slow
def test_no_dead_links(preview):
    assert not dead_links(preview), dead_links(preview)
