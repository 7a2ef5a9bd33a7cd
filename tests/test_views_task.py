"""Paper 001's view classification (echobook.tasks.views): what each variant trains, the weighted cross-entropy, the
five test frames and their vote, the per-class scores on a hand example, the permutation test's direction, a tiny fit
through `training.fit`, and the 18-class phantom beside paper 002's unchanged 10-view default."""
import json
from pathlib import Path
import numpy as np, pandas as pd
import pytest
import torch
import torch.nn.functional as F

from echobook.tasks.views import (VARIANTS, build_view_model, trainable_names, class_weights, WeightedCE, RandomFrames,
                                  per_class_scores, view_scores, view_slug, permutation_greater, compare_predictions,
                                  evaluate_views, views_summary, view_data, train_views, predict_views, keep_blocks, ood_table)
from echobook.data.views import five_frames
from echobook.data.view_phantom import (VIEWS, ECHOAPEX_VIEWS, ECHOAPEX_WEIGHTS, make_view_phantom, split_counts, view_layout)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def views18(tmp_path_factory):
    "A small 18-class phantom (train, val, test) at 32 px."
    root = tmp_path_factory.mktemp('views18')
    ph = make_view_phantom(root/'views', dict(train=40, val=20, test=20), size=32, frames=(5, 7), views=ECHOAPEX_VIEWS,
                           weights=ECHOAPEX_WEIGHTS, progress=False)
    return view_data(ph, root/'cache', prep_size=32, progress=False), ph


# --- what trains -----------------------------------------------------------------------------------------------------

def test_adapter_variant_trains_only_adapters_and_head():
    m = build_view_model('echoapex_adas', 18, size=32, depth=2, adapter=8)
    names = trainable_names(m)
    assert names and all('.adapter.' in n or n.startswith('head.') for n in names)
    assert any('.adapter.' in n for n in names) and {'head.weight', 'head.bias'} <= set(names)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) < .05 * sum(p.numel() for p in m.parameters())


def test_linear_variant_trains_only_the_head_and_full_everything():
    assert set(trainable_names(build_view_model('echoapex_s_linear', 18, size=32, depth=1))) == {'head.weight', 'head.bias'}
    full = build_view_model('echoapex_s', 18, size=32, depth=1)
    assert all(p.requires_grad for p in full.parameters())


def test_variants_follow_table_2():
    assert {v['label'] for v in VARIANTS.values()} >= {'ResNet50-IN', 'EchoApex-S', 'EchoApex-AdaS', 'EchoApex-B', 'EchoApex-AdaB'}
    assert VARIANTS['echoapex_adas']['adapter'] == 192 and VARIANTS['echoapex_adab']['adapter'] == 384
    assert VARIANTS['echoapex_b']['size'] == 112 and VARIANTS['echoapex_s']['size'] == VARIANTS['resnet50_in']['size'] == 128
    assert VARIANTS['echoapex_b']['lr'] == 1e-5 and VARIANTS['resnet50_in']['lr'] == 1e-4
    with pytest.raises(ValueError, match='variants'): build_view_model('echoapex_xl', 18)


def test_inputs_are_scaled_to_minus_one_one_and_the_head_sees_the_cls_feature():
    m = build_view_model('echoapex_b', 18, size=28, depth=1)
    x = torch.tensor([0., 127.5, 255.]).view(1, 1, 1, 1, 3).expand(1, 3, 1, 1, 3)
    assert torch.allclose(m.encoder.normalize(x)[0, 0, 0, 0], torch.tensor([-1., 0., 1.]))
    assert m.head.in_features == 768   # DINOv2 ViT-B/14 read through its class token (pool='cls')
    with pytest.raises(ValueError, match='ViT'): keep_blocks(build_view_model('resnet50_in', 18, size=32).encoder, 1)


# --- loss, frames, vote ----------------------------------------------------------------------------------------------

def test_weighted_cross_entropy_weights():
    w = class_weights([0, 0, 0, 1, 2, 2], 4)
    assert torch.allclose(w, torch.tensor([6 / 9, 2., 1., 0.]))             # n / (C·n_c) over the 3 classes present
    logits, y = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 2, 2])
    assert torch.allclose(WeightedCE(w)(logits, y), F.cross_entropy(logits, y, weight=w))
    # the loss is the weighted mean Σ w_y·l / Σ w_y: a rare class's mistake weighs 3× a common class's
    lg, yy = torch.tensor([[5., 0., 0., 0.], [5., 0., 0., 0.]]), torch.tensor([1, 0])   # the rare class (1) wrong, the common (0) right
    l = F.cross_entropy(lg, yy, reduction='none')
    assert torch.isclose(WeightedCE(w)(lg, yy), (w[yy] * l).sum() / w[yy].sum())
    assert WeightedCE(w)(lg, yy) > F.cross_entropy(lg, yy)


def test_majority_vote_uses_the_five_frames(views18):
    (tables, classes), _ = views18
    assert list(five_frames(100)) == [0, 25, 50, 75, 99] and list(five_frames(7)) == [0, 1, 3, 5, 6]
    test = tables['test']
    assert (test.groupby('sequence').size() == 5).all()
    n = test.groupby('sequence').frame.max() + 1   # the last frame kept is N − 1
    assert (test.groupby('sequence').frame.min() == 0).all() and len(n)
    # three of five frames say class 2: the sequence is class 2, whatever the other two say
    one = test[test.sequence == test.sequence.iloc[0]]
    scores = np.zeros((5, len(classes))); scores[[0, 1, 2], 2] = 1; scores[3, 0] = 5; scores[4, 1] = 5
    per = evaluate_views(scores, one, classes, majority_label=0)
    assert per.pred.tolist() == [2] and per.majority_pred.tolist() == [0]


def test_random_frames_draw_every_sequence(views18):
    (tables, _), _ = views18
    ds = RandomFrames(tables['train'], 32, draws=3)
    assert len(ds) == 3 * tables['train'].sequence.nunique()
    x, y = ds[0]
    assert x.shape == (3, 1, 32, 32) and 0 <= int(y) < 18


# --- metrics and tests -----------------------------------------------------------------------------------------------

def test_per_class_scores_hand_example():
    pc = per_class_scores([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ['A', 'B', 'C'])
    assert np.allclose(pc.recall, [.5, 1, .5]) and np.allclose(pc.specificity, [.75, .75, 1])
    assert np.allclose(pc.precision, [.5, 2 / 3, 1]) and np.allclose(pc.f1, [.5, .8, 2 / 3])
    assert np.allclose(pc.bacc, [.625, .875, .75])
    s = view_scores([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ['A', 'B', 'C'])
    assert np.isclose(s['bacc'], .75) and np.isclose(s['acc'], 2 / 3) and np.isclose(s['bacc_c'], .75)
    assert np.isnan(per_class_scores([0, 0], [0, 1], ['A', 'B']).bacc['B'])   # a class absent from the truth: no score
    assert view_slug('Cont:A2C') == 'cont_a2c'


def test_paper_tables_are_means_of_the_per_class_rows():
    "Table 3's BACC and accuracy of ResNet50-IN are the means of Table 5's per-class columns (quoted in paper001.yaml)."
    from echobook.config import load_citation
    row = next(r for r in load_citation('paper001', 'views')['rows'] if r['variant'] == 'resnet50_in')
    per = [row[f'bacc_{view_slug(v)}'][0] for v in ECHOAPEX_VIEWS]
    assert len(per) == 18 and abs(np.mean(per) - row['bacc'][0]) < 1e-3


def test_permutation_test_direction():
    rng = np.random.default_rng(0)
    hi, lo = rng.normal(.9, .01, 200), rng.normal(.8, .01, 200)
    assert permutation_greater(hi, lo) < .01 and permutation_greater(lo, hi) > .99
    y = np.repeat(np.arange(3), 20)
    good, bad = y.copy(), np.where(rng.uniform(size=60) < .5, y, (y + 1) % 3)
    cmp = compare_predictions(y, good, bad, ['A', 'B', 'C'], n_boot=100)
    assert cmp.significant.all() and (compare_predictions(y, bad, good, ['A', 'B', 'C'], n_boot=100).p > .5).all()


# --- a tiny fit ------------------------------------------------------------------------------------------------------

def test_tiny_fit_step_and_summary(views18, tmp_path):
    (tables, classes), _ = views18
    torch.manual_seed(0)
    m = build_view_model('echoapex_adas', len(classes), size=32, depth=1, adapter=8)
    head0, blocks0 = m.head.weight.detach().clone(), m.encoder.model.blocks[0].attn.qkv.weight.detach().clone()
    log = train_views(m, tables, tmp_path/'fit', dict(t=1), len(classes), 32, epochs=1, lr=1e-2, batch_size=16, progress=False)
    assert len(log) == 1 and np.isfinite(log.valid_loss).all() and (tmp_path/'fit'/'log.csv').exists()
    assert not torch.equal(head0, m.head.weight) and torch.equal(blocks0, m.encoder.model.blocks[0].attn.qkv.weight)
    per = evaluate_views(predict_views(m, tables['test'], 32), tables['test'], classes, 0)
    summary, per_class, tests = views_summary(per, classes, n_boot=50)
    assert {'model/bacc/mean', 'model/bacc/std', 'majority/bacc/mean', 'model/bacc_plax_val/mean'} <= set(summary)
    assert np.isclose(summary['majority/bacc/mean'], .5) and len(per) == tables['test'].sequence.nunique()
    assert set(tests.index) == set(classes) | {'mean'}


def test_ood_frames_are_five_per_sequence(views18):
    (_, classes), ph = views18
    items = pd.DataFrame(dict(sequence=['s'], view=['A4C'], path=[str(next((ph/'test'/'A4C').iterdir()))], reader=['video']))
    frames, table = ood_table(items, classes, 24)
    assert frames.shape == (5, 24, 24) and table.label.tolist() == [classes.index('A4C')] * 5


# --- the phantom --------------------------------------------------------------------------------------------------------

def test_eighteen_class_phantom_keeps_the_ten_view_default():
    assert len(ECHOAPEX_VIEWS) == 18 and len(VIEWS) == 10
    assert split_counts(200, 'train') == split_counts(200, 'train', views=VIEWS)   # paper 002's proportions, unchanged
    assert view_layout('A4C') == view_layout('4CH')
    with pytest.raises(ValueError, match='balanced=True or weights'): split_counts(40, views=ECHOAPEX_VIEWS)


def test_echoapex_rows_use_the_pretraining_checkpoint(tmp_path):
    "With echoapex=True the EchoApex rows load the teacher ViT that echoapex_pretrain writes (`<arch>.echoapex`); others keep theirs."
    import timm
    from echobook.models.encoders import save_echoapex
    from echobook.tasks.views import echoapex_name
    vit = timm.create_model('vit_small_patch8_224.dino', pretrained=False, img_size=32, depth=2)
    save_echoapex(vit, 'vit_small_patch8_224', tmp_path)
    for name in ('echoapex_s', 'echoapex_adas', 'echoapex_s_linear'):
        m = build_view_model(name, 18, pretrained=True, weights_dir=tmp_path, size=32, echoapex=True)
        assert m.encoder.spec.name == 'vit_small_patch8_224.echoapex' and m.encoder.spec.loaded_from.startswith(str(tmp_path))
        assert torch.equal(m.encoder.model.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert echoapex_name('vit_base_patch14_dinov2.lvd142m') == 'vit_base_patch14_dinov2.echoapex'
    with pytest.raises(ValueError, match='no EchoApex version'): echoapex_name('resnet50.a1_in1k')
    with pytest.raises(Exception, match='vit_base_patch14_dinov2.echoapex'):   # not pretrained yet: the error names the file
        build_view_model('echoapex_b', 18, pretrained=True, weights_dir=tmp_path, size=28, echoapex=True)
