"""The phantom's LV sits, leans and measures like real EchoNet-Dynamic tracings; stale phantom folders are never reused."""
import json

import numpy as np
import pandas as pd
import pytest

from echobook.core import EchobookDataError, read_json
from echobook.data.clips import prepare_cache, read_cache_index
from echobook.data.phantom import (LV_AXIS, PHANTOM_INFO, PHANTOM_VERSION, check_phantom, current_phantom, make_phantom,
                                   phantom_geometry, phantom_problem, tracing_geometry)

# EchoNet-Dynamic 5 / 50 / 95 % at 112×112 px: shared/design/methods.md, "What real EchoNet-Dynamic looks like"
# (LV geometry in the frame; traced cavity area at ED; EF percentiles).
REAL = dict(ED_cx=(54, 60, 71), ED_cy=(48, 58, 66), ES_cx=(53, 60, 70), ES_cy=(47, 56, 62),
            apex_x=(44, 53, 61), apex_y=(17, 27, 34), base_x=(58, 64, 77), base_y=(71, 85, 99),
            length=(46, 59, 73), angle=(68, 79, 86), ED_area=(1000, 1800, 2700), EF=(27.9, 59.2, 69.1))
PLACE = ['ED_cx', 'ED_cy', 'ES_cx', 'ES_cy', *LV_AXIS]


@pytest.fixture(scope='module')
def geometry():
    "ED/ES geometry of the tracings a 60-video phantom (seed 7, not the chapter's) is written with."
    return phantom_geometry(60, seed=7)


@pytest.mark.parametrize('key', PLACE)
def test_median_inside_real_range(geometry, key):
    lo, med, hi = REAL[key]
    m = geometry[key].median()
    assert lo < m < hi, f'{key}: phantom median {m:.1f} outside the real 5-95 % range {lo}-{hi}'
    assert abs(m - med) < 0.35*(hi - lo), f'{key}: phantom median {m:.1f} far from the real median {med}'


@pytest.mark.parametrize('key', PLACE)
def test_spread_like_real(geometry, key):
    lo, _, hi = REAL[key]
    p5, p95 = geometry[key].quantile([.05, .95])
    assert 0.5 < (p95 - p5)/(hi - lo) < 1.6, f'{key}: phantom 5-95 % {p5:.1f}-{p95:.1f}, real {lo}-{hi}'


def test_area_and_ef_still_real(geometry):
    assert abs(geometry.ED_area.median() - 1800) < 300 and abs(geometry.ES_area.median() - 1040) < 200
    assert abs(geometry.EF.median() - 59.2) < 6 and 0.05 < (geometry.EF < 50).mean() < 0.4


def test_tracing_geometry_reads_either_end_order():
    tr = np.array([[50., 20, 60, 80]] + [[40., 20 + 3*i, 70, 20 + 3*i] for i in range(20)])
    flipped = tr.copy(); flipped[0] = [60, 80, 50, 20]
    a, b = tracing_geometry(tr), tracing_geometry(flipped)
    assert a == b and (a['apex_x'], a['apex_y'], a['base_y']) == (50, 20, 80)
    assert np.isclose(a['angle'], np.degrees(np.arctan2(60, 10))) and np.isclose(a['area'], 30*57)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    "A 3-video phantom written through `current_phantom`."
    return current_phantom(tmp_path_factory.mktemp('p')/'phantom-3', n_videos=3, seed=7, progress=False)


def test_files_hold_the_planned_tracings(small):
    "The written VolumeTracings are the ones `phantom_geometry` measures (ED = the larger traced cavity)."
    vt, plan = pd.read_csv(small/'VolumeTracings.csv'), phantom_geometry(3, seed=7).set_index('FileName')
    for name, d in vt.groupby('FileName'):
        frames = [g[['X1', 'Y1', 'X2', 'Y2']].to_numpy() for _, g in d.groupby('Frame')]
        ed = tracing_geometry(max(frames, key=lambda t: tracing_geometry(t)['area']))
        assert np.allclose([ed[k] for k in LV_AXIS], plan.loc[name[:-4], list(LV_AXIS)].astype(float), atol=1e-3)


def test_folder_records_its_generator(small):
    info = read_json(small/PHANTOM_INFO)
    assert info['version'] == PHANTOM_VERSION and info['n_videos'] == 3 and info['seed'] == 7
    assert phantom_problem(small, n_videos=3, seed=7, domain='echonet') is None
    assert 'other arguments' in phantom_problem(small, n_videos=4, seed=7)
    assert current_phantom(small, n_videos=3, seed=7, progress=False) == small


def test_old_phantom_is_rewritten_and_its_cache_decoded_again(tmp_path):
    data = current_phantom(tmp_path/'phantom-2', n_videos=2, progress=False)
    cache = prepare_cache(data, tmp_path/'phantom-2-cache', progress=False)
    (data/PHANTOM_INFO).unlink()                                 # as the version-1 generator left its folders
    with pytest.raises(EchobookDataError, match='older phantom generator') as e: check_phantom(data, n_videos=2)
    assert str(data) in str(e.value)
    (data/PHANTOM_INFO).write_text(json.dumps(dict(version=PHANTOM_VERSION - 1)))
    assert f'version {PHANTOM_VERSION - 1}' in phantom_problem(data, n_videos=2)
    with pytest.warns(UserWarning, match=f'version {PHANTOM_VERSION - 1}'):
        current_phantom(data, n_videos=2, progress=False)
    assert phantom_problem(data, n_videos=2) is None
    with pytest.raises(EchobookDataError, match='changed since the cache was prepared'): read_cache_index(cache)
    prepare_cache(data, cache, progress=False)
    meta = read_json(cache/'meta.json')
    assert meta['n_reused'] == 0 and meta['n_decoded'] == meta['n_clips'] > 0


def test_other_data_is_never_overwritten(tmp_path):
    real = tmp_path/'echonet'; real.mkdir(); (real/'FileList.csv').write_text('FileName\n')
    other = tmp_path/'camus'; other.mkdir(); (other/'notes.txt').write_text('x')
    for d in (real, other):
        with pytest.raises(EchobookDataError, match='not a phantom'): current_phantom(d, n_videos=3, progress=False)
    assert (real/'FileList.csv').read_text() == 'FileName\n' and (other/'notes.txt').exists()
