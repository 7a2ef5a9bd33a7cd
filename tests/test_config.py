"""One config schema: table YAMLs, task profiles and citations fail closed, naming the file and the key; typed parameters."""
from pathlib import Path
import pytest

from echobook.core import ConfigError
from echobook.config import (list_tables, load_table_config, check_table_config, read_yaml, coerce_params, load_profile,
                             check_data_dir, load_citation, parameter_defaults, configs_root, repo_root)

LANDMARKS = repo_root()/'nbs'/'experiments'/'landmarks.ipynb'
TABLE3 = (configs_root()/'table3.yaml').read_text()


def table3_with(tmp_path, old, new):
    "Table 3's config with one edit, written as tmp_path/configs/table3.yaml and checked."
    assert old in TABLE3, old
    p = tmp_path/'configs'/'table3.yaml'
    p.parent.mkdir(exist_ok=True)
    p.write_text(TABLE3.replace(old, new))
    return check_table_config(read_yaml(p), p, schema=parameter_defaults(LANDMARKS))


def test_shipped_configs_pass():
    for t in list_tables(): load_table_config(t)                     # every shipped table/figure config is valid


@pytest.mark.parametrize('old,new,message', [
    ('fixed:', 'fixd:', "table3.yaml: unknown key 'fixd' (did you mean 'fixed'?)"),
    ('    set: {profile: tiny', '    sett: {profile: tiny', "table3.yaml: profiles.tiny: unknown key 'sett' (did you mean 'set'?)"),
    ('fixed: {fraction: 1.0', 'fixed: {fractoin: 1.0', "table3.yaml: fixed: unknown parameter 'fractoin' (did you mean 'fraction'?)"),
    ('set: {profile: paper, pretrained: true, epochs: 100', 'set: {profile: paper, pretrained: true, epoch: 100',
     "profiles.paper.set: unknown parameter 'epoch' (did you mean 'epochs'?)"),
    ('  head: [gcn, mlp]', '  heads: [gcn, mlp]', "grid: unknown parameter 'heads' (did you mean 'head'?)"),
    ('  rows: [encoder, k', '  row: [encoder, k', "table3.yaml: table: unknown key 'row' (did you mean 'rows'?)"),
    ('cite: {file: paper000, table: table3}', 'cite: {file: paper000, tabel: table3}', "cite: unknown key 'tabel'"),
])
def test_misspelled_key_names_file_and_key(tmp_path, old, new, message):
    with pytest.raises(ConfigError) as e: table3_with(tmp_path, old, new)
    assert message in str(e.value)


def test_exclude_must_name_grid_keys_and_values(tmp_path):
    with pytest.raises(ConfigError, match=r"table3.yaml: exclude: 'fraction' is not a grid key"):
        table3_with(tmp_path, '{encoder: panecho.panecho, k: 2}', '{encoder: panecho.panecho, fraction: 1.0}')
    with pytest.raises(ConfigError, match=r"exclude: encoder: 'panecho' is not a value of the grid"):
        table3_with(tmp_path, '{encoder: panecho.panecho, k: 2}', '{encoder: panecho, k: 2}')
    cfg = table3_with(tmp_path, '{encoder: panecho.panecho, k: 2}', '{encoder: panecho.panecho, augment: "false"}')
    assert cfg['exclude'] == [{'encoder': 'panecho.panecho', 'augment': False}]   # typed like the grid


def test_grid_values_and_paper_weights_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="grid: augment='nope' is not a valid bool"):
        table3_with(tmp_path, 'augment: [true, false]', 'augment: [true, nope]')
    with pytest.raises(ConfigError, match='profiles.paper: set `pretrained`'):
        table3_with(tmp_path, 'set: {profile: paper, pretrained: true,', 'set: {profile: paper,')
    assert table3_with(tmp_path, 'lr: 0.0005}', 'lr: 5e-4}')['profiles']['paper']['set']['lr'] == 0.0005   # YAML's string '5e-4'


def test_corrupt_yaml_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r'configs/table3.yaml: line 1\d, column \d+: invalid YAML'):
        table3_with(tmp_path, '  k: [0, 2, 16]', '  k: [0, 2, 16')
    p = tmp_path/'x.yaml'
    p.write_text('- a list\n- not a mapping\n')
    with pytest.raises(ConfigError, match='x.yaml: expected a mapping'): read_yaml(p)
    with pytest.raises(ConfigError, match="no table config 'tabel3' \\(did you mean 'table3'\\?\\)"): load_table_config('tabel3')


def test_coerce_params():
    d = dict(augment=True, k=16, lr=0.0005, encoder='x', fraction=1.0, epochs=int, data_dir=None)
    out = coerce_params(dict(augment='false', k='3', lr='1e-4', encoder=5, fraction=1, epochs='None', data_dir=Path('/d')), d)
    assert out == dict(augment=False, k=3, lr=1e-4, encoder='5', fraction=1.0, epochs=None, data_dir=Path('/d'))
    assert out['augment'] is False and type(out['k']) is int and type(out['fraction']) is float
    for v, want in [('no', False), ('0', False), ('yes', True), ('True', True), (1, True)]:
        assert coerce_params(dict(augment=v), d)['augment'] is want
    for bad in [dict(augment='maybe'), dict(k='2.5'), dict(k=True), dict(lr='fast'), dict(augment=2)]:
        with pytest.raises(ConfigError, match=f"where.yaml: {next(iter(bad))}="): coerce_params(bad, d, where='where.yaml')
    with pytest.raises(ConfigError, match="unknown parameter 'agument' \\(did you mean 'augment'\\?\\)"): coerce_params(dict(agument=1), d)


@pytest.fixture
def configs(tmp_path):
    "A configs folder with one task profile and one citations file."
    (tmp_path/'profiles').mkdir(); (tmp_path/'citations').mkdir()
    (tmp_path/'profiles'/'toy.yaml').write_text('task: toy\ndescription: a toy task\n'
                                                'defaults: {lr: 0.0005, epochs: 100, augment: true, workers: null}\n'
                                                'profiles:\n  tiny: {lr: 1e-4, epochs: 12}\n  paper: {}\n')
    (tmp_path/'citations'/'paperX.yaml').write_text(
        'paper: X et al.\ndeviations:\n'
        '  - {what: phantom data, paper: real data (line 1), ours: a phantom, why: no data here, switch: --data DIR, profile: tiny}\n'
        'tables:\n  t1:\n    source: Table 1\n    rows: [{k: 1, dice: [90.1, 2.0]}]\n    deviations:\n'
        "      - {what: fewer epochs, paper: 100 (line 2), ours: '12', why: CPU, switch: '-p epochs 100'}\n")
    return tmp_path


def test_load_profile(configs):
    assert load_profile('toy', 'tiny', configs, epochs=None, augment='false') == dict(lr=1e-4, epochs=12, augment=False, workers=None, profile='tiny')
    assert load_profile('toy', 'paper', configs, workers='2')['workers'] == '2'      # a None default takes the value as it is
    with pytest.raises(ConfigError, match="profiles/toy.yaml: unknown profile 'papr' \\(did you mean 'paper'\\?\\)"): load_profile('toy', 'papr', configs)
    with pytest.raises(ConfigError, match="unknown parameter 'epoch' \\(did you mean 'epochs'\\?\\)"): load_profile('toy', 'tiny', configs, epoch=3)
    (configs/'profiles'/'bad.yaml').write_text('task: bad\ndefaults: {lr: 0.1}\nprofiles:\n  tiny: {lrr: 0.2}\n')
    with pytest.raises(ConfigError, match="bad.yaml: profiles.tiny: unknown parameter 'lrr'"): load_profile('bad', 'tiny', configs)
    (configs/'profiles'/'bad.yaml').write_text('task: other\ndefaults: {lr: 0.1}\nprofiles: {tiny: {}}\n')
    with pytest.raises(ConfigError, match="bad.yaml: task: 'other' must equal the file name 'bad'"): load_profile('bad', 'tiny', configs)
    (configs/'profiles'/'bad.yaml').write_text('task: bad\ndefaults: {lr: 0.1\n')
    with pytest.raises(ConfigError, match=r'bad.yaml: line \d+, column \d+: invalid YAML'): load_profile('bad', 'tiny', configs)


def test_check_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="'paper' profile needs the real data: pass --data"): check_data_dir('paper', None)
    with pytest.raises(ConfigError, match='nope: folder not found'): check_data_dir('paper', tmp_path/'nope')
    assert check_data_dir('paper', None, allow_phantom=True) is None and check_data_dir('tiny', None) is None
    assert check_data_dir('paper', tmp_path) == tmp_path


def test_load_citation(configs):
    c = load_citation('paperX', 't1', configs)
    assert c['source'] == 'Table 1' and c['rows'] == [{'k': 1, 'dice': [90.1, 2.0]}] and c['paper'] == 'X et al.'
    assert [(d['what'], d['ours'], d['profile'], d['scope'], d['tables']) for d in c['deviations']] == [
        ('phantom data', 'a phantom', 'tiny', None, None), ('fewer epochs', '12', 'all', 't1', None)]
    with pytest.raises(ConfigError, match="paperX.yaml: no table 't2'"): load_citation('paperX', 't2', configs)
    (configs/'citations'/'paperX.yaml').write_text('paper: X\ntables:\n  t1: {sorce: Table 1}\n')
    with pytest.raises(ConfigError, match="paperX.yaml: tables.t1: unknown key 'sorce' \\(did you mean 'source'\\?\\)"): load_citation('paperX', 't1', configs)
    for f in configs_root().glob('citations/*.yaml'):                                # every shipped citations file reads
        import yaml
        for t in yaml.safe_load(f.read_text())['tables']: assert load_citation(f.stem, t)['source']


DEV = "{what: w, paper: p (line 1), ours: o, why: y, switch: s}"

@pytest.mark.parametrize('entry, message', [
    ('fewer epochs', r'deviations\[1\]: expected a mapping .*plain strings are no longer accepted'),
    ('{what: w, paper: p, ours: o, switch: s}', r"deviations\[1\]: missing key 'why'"),
    ("{what: w, paper: p, ours: '', why: y, switch: s}", r'deviations\[1\]: ours: expected a non-empty text'),
    ('{what: w, paper: p, ours: o, why: y, swich: s}', r"deviations\[1\]: unknown key 'swich' \(did you mean 'switch'\?\)"),
    ('{what: w, paper: p, ours: o, why: y, switch: none}', r"deviations\[1\]: switch: write 'none: <the reason>'"),
    ('{what: w, paper: p, ours: o, why: y, switch: s, profile: cpu}', r"deviations\[1\]: profile: 'cpu' is not one of tiny, paper, all"),
    ('{what: w, paper: p, ours: o, why: y, switch: s, tables: table3}', r'deviations\[1\]: tables: expected a non-empty list'),
])
def test_deviation_schema(configs, entry, message):
    "A bad deviation, file-level or per table, names the file, where it is, its index and the key."
    f = configs/'citations'/'paperX.yaml'
    f.write_text(f'paper: X\ndeviations: [{DEV}, {entry}]\ntables:\n  t1: {{source: Table 1}}\n')
    with pytest.raises(ConfigError, match=r'paperX.yaml: ' + message): load_citation('paperX', 't1', configs)
    f.write_text(f'paper: X\ntables:\n  t1:\n    source: Table 1\n    deviations: [{DEV}, {entry}]\n')
    with pytest.raises(ConfigError, match=r'paperX.yaml: tables.t1.' + message): load_citation('paperX', 't1', configs)


def test_deviation_tables_are_table_configs(configs):
    "`tables` names are checked against the table configs beside the citations folder (a typo would apply nowhere)."
    (configs/'table3.yaml').write_text('notebook: x.ipynb\ngrid: {k: [1]}\n')
    f = configs/'citations'/'paperX.yaml'
    f.write_text(f"paper: X\ndeviations: [{DEV[:-1]}, tables: [tabel3]}}]\ntables:\n  t1: {{source: Table 1}}\n")
    with pytest.raises(ConfigError, match=r"paperX.yaml: deviations\[0\]: tables: 'tabel3' is not a table config \(did you mean 'table3'\?\)"):
        load_citation('paperX', 't1', configs)
    f.write_text(f"paper: X\ndeviations: [{DEV[:-1]}, tables: [table3]}}]\ntables:\n  t1: {{source: Table 1}}\n")
    assert load_citation('paperX', 't1', configs)['deviations'][0]['tables'] == ['table3']
