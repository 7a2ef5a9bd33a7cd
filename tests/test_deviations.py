"""Deviations from the papers: every citations file declares them in one schema, and each table gets the ones that apply."""
import re
import pytest

from echobook.config import (DEVIATION_KEYS, DEVIATION_PROFILES, configs_root, list_citations, list_tables, read_citation,
                             load_table_config)
from echobook.tables import table_deviations, deviations_markdown, paper_deviations, table_paper, build_table

CITATIONS = list_citations()


def _all(doc): return doc['deviations'] + [d for t in doc['tables'].values() for d in t['deviations']]


@pytest.mark.parametrize('file', CITATIONS)
def test_every_paper_declares_its_deviations(file):
    "Each citations file has deviations; each names its paper's seed line, has every key filled and reaches a table."
    devs = paper_deviations(file)
    assert devs, f'{file}.yaml: no deviations'
    seed = re.search(r'\d{3}', file).group()
    for i, d in enumerate(devs):
        assert all(isinstance(d[k], str) and d[k].strip() for k in DEVIATION_KEYS), (file, i, d)
        assert d['profile'] in DEVIATION_PROFILES, (file, i)
        assert re.search(rf'seed {seed} lines? \d+', d['paper']), f"{file}.yaml deviation {i} ({d['what']}): cite the seed line"
        assert d['switch'].startswith('none: ') or not d['switch'].lower().startswith('none'), (file, i)
        assert d['applies_to'], f"{file}.yaml deviation {i} ({d['what']}) applies to no table config"
    whats = [d['what'] + d['profile'] + str(d['tables']) for d in devs]
    assert len(set(whats)) == len(whats), f'{file}.yaml: duplicate deviations'


def test_every_table_has_deviations():
    "Every table config belongs to a paper and gets at least one deviation."
    for t in list_tables():
        assert table_paper(t) in CITATIONS, t
        assert table_deviations(t), t


def test_table_deviations_follow_tables_and_citation():
    "An entry with `tables` reaches only those configs; a paper's entries stay with its own tables."
    only2 = {d['what'] for d in read_citation('paper000')['deviations'] if d['tables'] == ['table2']}
    assert only2
    assert only2 <= {d['what'] for d in table_deviations('table2')}
    assert not only2 & {d['what'] for d in table_deviations('table3')}
    p0 = {d['what'] for d in table_deviations('table3')}
    assert p0 and not p0 & {d['what'] for d in table_deviations('dfkd_table1')}
    assert {d['citation'] for d in table_deviations('ef_echoapex')} == {'paper001'}


WRITE = dict(what='w', paper='p (seed 000 line 1)', ours='o', why='y')

@pytest.fixture
def toy(tmp_path):
    "A configs folder: two table configs citing two tables of one file, a figure without `cite`, and its citations."
    import yaml
    (tmp_path/'citations').mkdir()
    nb = 'nbs/experiments/landmarks.ipynb'
    for name, cite in [('ta', {'file': 'toy', 'table': 't1'}), ('tb', {'file': 'toy', 'table': 't2'}), ('fig', None)]:
        (tmp_path/f'{name}.yaml').write_text(yaml.safe_dump(dict(notebook=nb, grid={'k': [0]}, **({'cite': cite} if cite else {}))))
    dev = lambda what, **kw: dict(WRITE, what=what, switch='-p k 2', **kw)
    doc = dict(paper='Toy', deviations=[dev('everywhere'), dev('only tb', tables=['tb']), dev('tiny only', profile='tiny'),
                                        dev('paper only', profile='paper')],
               tables=dict(t1=dict(source='Table 1', deviations=[dev('t1 only')]), t2=dict(source='Table 2')))
    (tmp_path/'citations'/'toy.yaml').write_text(yaml.safe_dump(doc))
    return tmp_path


def test_table_deviations_filtering(toy):
    "By `tables`, by the cited table (per-table entries), by profile; a figure without `cite` inherits its notebook's paper."
    whats = lambda t, **kw: [d['what'] for d in table_deviations(toy/f'{t}.yaml', **kw)]
    assert whats('ta') == ['everywhere', 'tiny only', 'paper only', 't1 only']
    assert whats('tb') == ['everywhere', 'only tb', 'tiny only', 'paper only']
    assert whats('fig') == ['everywhere', 'tiny only', 'paper only']
    assert whats('ta', profile='tiny') == ['everywhere', 'tiny only', 't1 only']
    assert whats('tb', profile={'paper'}) == ['everywhere', 'only tb', 'paper only']
    assert table_paper(load_table_config(toy/'fig.yaml')) == 'toy'


def test_deviations_markdown():
    "One row per entry, the five columns in order, pipes escaped, the profile named; nothing for no entries."
    md = deviations_markdown([dict(WRITE, switch='a | b', profile='tiny'), dict(WRITE, what='x', switch='none: n')])
    lines = md.strip().splitlines()
    assert lines[0] == '| What | Paper | Ours | Why | Switch |' and len(lines) == 4
    assert lines[2] == '| w (tiny profile) | p (seed 000 line 1) | o | y | a \\| b |'
    assert deviations_markdown([]) == ''
    assert deviations_markdown([dict(WRITE, switch='s', applies_to=['t1', 't2'])], tables=True).splitlines()[2].startswith('| w | t1, t2 |')


def test_built_table_lists_the_deviations(tmp_path):
    "The table's Markdown and HTML carry the deviations that apply, under the table."
    t = build_table('table2', tmp_path/'runs')
    assert t.deviations and [d['what'] for d in t.deviations] == [d['what'] for d in table_deviations('table2')]
    md = t.markdown
    assert md.index('Deviations from the paper') > md.index('91.42 ± 3.82')
    assert all(d['what'] in md for d in t.deviations) and 'echobook-deviations' in t.html
