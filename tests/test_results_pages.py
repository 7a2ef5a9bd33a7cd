"""The paired test on the results pages: each run against its baseline on the same test items, read from the per-item
files of synthetic run folders (direction, n, p), the message when a file is missing, and a page that types no number."""
import re
import numpy as np, pandas as pd, pytest
from scipy import stats

from echobook.config import load_table_config
from echobook.tables import table_citation
from echobook.results import (ALPHA, baseline_tests, baseline_caption, fake_item_run, landmark_pairs, baseline_metrics,
                              MissingOutput, _page_cells)

ONE_PER_EXPERIMENT = ['table4', 'ef_videomae', 'dfkd_table1', 'dfkd_table2', 'probing_fig2']


@pytest.mark.parametrize('table', ONE_PER_EXPERIMENT)
def test_paired_test_direction_and_p(tmp_path, table):
    "A model better than its baseline on every item beats it (p = 2⁻ⁿ, exact); a worse one does not (one-sided)."
    fake_item_run(tmp_path, table, 'better', effect=.2, n=10)
    fake_item_run(tmp_path, table, 'worse', effect=-.2, n=10, seed=1)
    df = baseline_tests(table, tmp_path)
    main = df.groupby('run').head(1).set_index('run')
    assert main.loc['better', 'beats'] and main.loc['better', 'n'] == 10
    assert main.loc['better', 'p'] <= 0.5 ** 7       # (nearly) every difference in the good direction: exact p = 2^-(nonzero ones)
    assert not main.loc['worse', 'beats'] and main.loc['worse', 'p'] > 1 - ALPHA
    cfg = load_table_config(table)
    good = 1 if main.loc['better', 'metric'].endswith('↑') else -1
    assert good * main.loc['better', 'difference'] > 0 > good * main.loc['worse', 'difference']
    assert len(df) == 2 * len(baseline_metrics(cfg))


def test_p_matches_scipy_on_the_files(tmp_path):
    "The page's p is scipy's one-sided Wilcoxon of the per-video values written in the run folder."
    d = fake_item_run(tmp_path, 'fig2', 'noisy', effect=.005, n=15, seed=3)
    a, b = pd.read_csv(d/'per_video.csv'), pd.read_csv(d/'mean_shape_per_video.csv')
    want = stats.wilcoxon(a.dice_ed, b.dice_ed, alternative='greater').pvalue
    row = baseline_tests('fig2', tmp_path).set_index('metric').loc['Dice ED ↑']
    assert row.p == pytest.approx(want) and row.n == 15
    assert row.difference == pytest.approx(100 * (a.dice_ed - b.dice_ed).mean())   # Dice in %, as the table shows it


def test_missing_per_item_file_is_named(tmp_path):
    "A finished run without its per-item file: the caption names the file instead of failing."
    fake_item_run(tmp_path, 'ef_echoapex', 'old', files=False)
    df = baseline_tests('ef_echoapex', tmp_path)
    assert df.p.isna().all()
    cap = baseline_caption(df)
    assert 'No paired test for run `old`' in cap and 'ef_echoapex/old/per_video.csv` is missing' in cap
    d = fake_item_run(tmp_path, 'ef_echoapex', 'no-mean')
    pd.read_csv(d/'per_video.csv').drop(columns='ef_mean').to_csv(d/'per_video.csv', index=False)
    assert "no-mean/per_video.csv` has no column 'ef_mean'" in baseline_caption(baseline_tests('ef_echoapex', tmp_path))


def test_landmark_baseline_without_file_or_cache(tmp_path):
    "A landmark run without mean_shape_per_video.csv whose clip cache is gone: MissingOutput names both."
    d = fake_item_run(tmp_path, 'table2', 'run')
    (d/'mean_shape_per_video.csv').unlink()
    with pytest.raises(MissingOutput, match='mean_shape_per_video.csv` is missing and the baseline cannot be rebuilt.*cache'):
        landmark_pairs(d)


def test_captions(tmp_path):
    "The verdict in words: beats (with p), does not beat (pipeline check), too few items to ever reach ALPHA."
    assert baseline_caption(baseline_tests('table3', tmp_path)).startswith('No finished run yet')
    fake_item_run(tmp_path, 'table3', 'a', effect=.2)
    assert baseline_caption(baseline_tests('table3', tmp_path)).startswith('The run beats its baseline (Dice ED, mean shape: n = 12')
    fake_item_run(tmp_path, 'fig2', 'tiny', effect=.2, n=3)
    cap = baseline_caption(baseline_tests('fig2', tmp_path))
    assert 'does not beat its baseline on the phantom' in cap and 'checks the pipeline only' in cap
    assert 'cannot reach p < 0.05' in cap and 'smallest p is 0.125' in cap


_NUMBER = re.compile(r'\d+\.\d+|\d+\s*%')


def test_generated_pages_run_the_paired_test_and_type_no_number():
    "A generated page (one per experiment) calls show_baseline_tests; its markdown (title aside) states no number."
    for name in ONE_PER_EXPERIMENT:   # the cells `results_page` writes (without importing nbformat, slow to import)
        cfg = load_table_config(name)
        cells = _page_cells(cfg, table_citation(cfg) if cfg.get('cite') else None)
        assert ('code', f"show_baseline_tests('{name}')") in cells, name
        text = '\n'.join(src for kind, src in cells[1:] if kind == 'markdown')   # the title quotes the config
        assert not _NUMBER.findall(text), (name, _NUMBER.findall(text))


@pytest.mark.slow   # imports echobook.tasks (torch, torchvision): ~40 s on the loaded 2-core machine, the test itself < 1 s
def test_readers_take_what_the_experiments_write(tmp_path):
    "The probing and EF readers on files written by the experiments' own functions (evaluate_probing, ef_per_video)."
    from echobook.tasks.probing import evaluate_probing
    from echobook.tasks.ef import ef_per_video
    from echobook.results import probing_pairs, ef_pairs
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(8), 5)                                       # 8 test sequences of 5 images, 4 views
    table = pd.DataFrame(dict(sequence=[f's{i}' for i in seq], view=[f'v{i % 4}' for i in seq], label=seq % 4))
    scores = np.eye(4)[table.label] + rng.normal(0, .4, (len(table), 4))  # mostly right
    evaluate_probing(scores, table, [f'v{i}' for i in range(4)]).to_csv(tmp_path/'per_sequence_T1.csv', index=False)
    pairs, base = probing_pairs(tmp_path, 'T1/acc_img')
    assert len(pairs) == 8 and base == 'most frequent view (T1)' and pairs.baseline.sum() == 2   # view 0 of 8 sequences
    test = pd.DataFrame(dict(FileName=['a', 'b', 'c'], ef_filelist=[60., 40., 55.], ef_tracings=np.nan))
    ef_per_video(test, dict(model=[58., 45., np.nan]), 52.).to_csv(tmp_path/'per_video.csv', index=False)
    pairs, _ = ef_pairs(tmp_path)
    assert list(pairs.item) == ['a', 'b'] and list(pairs.model) == [2., 5.] and list(pairs.baseline) == [8., 12.]   # c excluded
