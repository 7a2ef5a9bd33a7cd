"""LV wall measurements (paper 001, Sec. 2.4): heatmap targets and decoding, the UNETR-style ViT model (adapters-only
training), EchoNet-LVH's DeepLabV3, the losses, the items of the reader, a tiny fit through the one trainer, the
evaluation against the training mean, and clear errors for bad inputs."""
import math
import numpy as np
import pandas as pd
import pytest
import torch

from echobook.data.lvh import make_lvh_phantom, scan_lvh
from echobook.models.encoders import create_encoder
from echobook.models.heatmaps import (gaussian_heatmaps, decode_threshold, decode_argmax, decode_soft_argmax, HeatmapLoss, ViTHeatmaps,
                                      DeepLabHeatmaps, Landmarks, last_block_attention, generalized_dice_loss)
from echobook.models.freezing import Adapter
from echobook.tasks.lvh import (lvh_items, item_landmarks, chain_landmarks, LVHFrames, to_model, from_model, build_lvh_model, lvh_loss,
                                train_lvh, predict_landmarks, mean_baseline, lvh_per_item, lvh_summary, r2_score, MEASURES)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope='module')
def lvh(tmp_path_factory):
    "A 16-video PLAX phantom, its items and 32 px datasets per split."
    scan = scan_lvh(make_lvh_phantom(tmp_path_factory.mktemp('lvh'), n_videos=16, seed=1))
    items = lvh_items(scan)
    return items, {s: LVHFrames(items[items.split == s], 32) for s in ('train', 'val', 'test')}


def _vit(size=32, **kw): return ViTHeatmaps(create_encoder('vit_small_patch8_224.dino', size=size), feature_size=8, **kw)

# --- heatmaps ----------------------------------------------------------------------------------------------------------

def test_heatmap_round_trip():
    pts = torch.tensor([[[5.2, 7.9], [20.0, 11.4], [13.7, 25.1]]])
    hm = gaussian_heatmaps(pts, 32, sigma=2.5)
    assert hm.shape == (1, 3, 32, 32) and hm.max() <= 1
    for dec in (decode_threshold, lambda h: decode_soft_argmax(h * 60)):
        assert torch.allclose(dec(hm), pts, atol=0.25)
    assert torch.allclose(decode_argmax(hm), pts.round())


def test_masked_landmark_gives_empty_channel_and_no_loss():
    tgt = torch.tensor([[[8., 8., 1.], [0., 0., 0.]]])
    assert gaussian_heatmaps(torch.tensor([[[8., 8.], [math.nan, 1.]]]), 16, 2)[0, 1].sum() == 0
    out = torch.zeros(1, 2, 16, 16)
    for kind in ('focal_dice', 'focal', 'wmse'):
        f = HeatmapLoss(kind, 2.0)
        changed = out.clone(); changed[:, 1] = 7.0
        assert torch.isclose(f(out, tgt), f(changed, tgt))
    assert generalized_dice_loss(out, out, torch.zeros(1, 2, dtype=torch.bool)) == 0


def test_dice_channels_do_not_mute_each_other():
    "Regression: the pooled generalised Dice let a broadly firing channel mute a silent one (the LVPW channel died)."
    pts = torch.tensor([[[8., 8.], [20., 6.], [10., 20.], [22., 24.]]])
    t, mask = gaussian_heatmaps(pts, 32, 2), torch.ones(1, 4, dtype=torch.bool)
    def silent_grad(fire, pooled):                                 # Dice gradient on silent channel 3 at its landmark
        p = t.clone(); p[:, 3] = 0.01; p[:, 0] = fire
        p.requires_grad_(True); generalized_dice_loss(p, t, mask, pooled=pooled).backward()
        return p.grad[0, 3, 24, 22].item()
    g = silent_grad(t[:, 0], False)
    assert g < 0 and g == pytest.approx(silent_grad(torch.ones(32, 32), False), rel=1e-6)   # per channel: independent
    assert abs(silent_grad(torch.ones(32, 32), True)) < abs(silent_grad(t[:, 0], True)) / 4   # the old, pooled form: muted
    assert HeatmapLoss('focal_dice').kind == 'focal_dice' and HeatmapLoss('focal_gdl').kind == 'focal_gdl'


def test_four_channels_learn_on_the_phantom(lvh):
    """Every landmark channel (the posterior wall's end included) lights up on annotated frames after a short fit (a sanity
    check: at this size the pooled Dice passes too; the collapse needs the tiny profile's longer fit, see the test above)."""
    items, ds = lvh
    torch.manual_seed(0)
    m, loss = _vit(depth=2), HeatmapLoss('focal_dice', 2)
    x, t = ds['train'].images, ds['train'].targets
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 3e-3)
    for i in range(40):
        b = torch.arange(i * 8, i * 8 + 8) % len(x)
        l = loss(m(x[b]), t[b]); opt.zero_grad(); l.backward(); opt.step()
    with torch.no_grad(): p = m(x).sigmoid().amax((2, 3))
    peak = [p[t[:, k, 2] > 0, k].mean().item() for k in range(4)]
    assert min(peak) > 0.3, peak


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r'\(B, K, 2\)'): gaussian_heatmaps(torch.zeros(4, 2), 8)
    with pytest.raises(ValueError, match='sigma'): gaussian_heatmaps(torch.zeros(1, 1, 2), 8, sigma=0)
    with pytest.raises(ValueError, match=r'\(B, K, 3\)'): HeatmapLoss()(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match='disagree'): HeatmapLoss()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match='focal_dice'): HeatmapLoss('l1')
    with pytest.raises(ValueError, match=r'\(B, K, H, W\)'): decode_threshold(torch.zeros(8, 8))
    with pytest.raises(ValueError, match='not a timm ViT'): ViTHeatmaps(create_encoder('resnet18_2d.in1k', size=32))
    with pytest.raises(ValueError, match='built for 32'): _vit()(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'\(B, 3, S, S\)'): _vit()(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match='depth'): _vit(depth=13)
    with pytest.raises(ValueError, match='model must be'): build_lvh_model('unet')
    with pytest.raises(ValueError, match=r'\(2, 2\)'): chain_landmarks({'IVS': [[1, 2, 3]]})

# --- models --------------------------------------------------------------------------------------------------------------

def test_vit_shapes_and_attention():
    m, x = _vit(), torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(): y = m(x)
    assert y.shape == (2, 4, 32, 32) and len(m.ups) == 3 and m.taps == [3, 7, 11]
    assert last_block_attention(m, x).shape == (2, 6, 4, 4)
    with torch.no_grad(): assert Landmarks(m)(x).shape == (2, 4, 2)


def test_adapters_only_trainable():
    m = _vit(adapters=True, adapter_dim=16)
    trainable = {n.split('.')[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {'encoder', 'stem', 'skips', 'ups', 'out'}
    enc = [n for n, p in m.encoder.named_parameters() if p.requires_grad]
    assert enc and all('.adapter.' in n for n in enc)             # the shared adapters of models.freezing, nothing else
    assert all(isinstance(b.adapter, Adapter) for b in m.encoder.blocks())
    full = [n for n, p in _vit().named_parameters() if p.requires_grad]
    assert any(n.startswith('encoder.') for n in full) and not any('.adapter.' in n for n in full)
    a = Adapter(8, 4); x = torch.randn(3, 5, 8)
    with torch.no_grad(): assert torch.equal(a(x), x)             # zero-initialised: the identity


def test_adapters_stay_frozen_through_a_step():
    m, before = _vit(adapters=True, adapter_dim=16), None
    before = {n: p.detach().clone() for n, p in m.encoder.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-2)
    before = {n: p for n, p in before.items() if '.adapter.' not in n}
    tgt = torch.tensor([[[8., 8., 1.], [20., 9., 1.], [12., 25., 1.], [26., 26., 0.]]])
    loss = HeatmapLoss('focal_dice', 2)(m(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)), tgt)
    opt.zero_grad(); loss.backward(); opt.step()
    assert all(torch.equal(before[n], p) for n, p in m.encoder.named_parameters() if n in before)


def test_deeplab_shapes():
    dl = DeepLabHeatmaps(4, 32, 'deeplabv3_mobilenet_v3_large').eval()
    with torch.no_grad(): assert dl(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 32, 32)
    assert dl.activation == 'identity' and lvh_loss(dl).kind == 'wmse' and lvh_loss(_vit()).kind == 'focal_dice'
    with pytest.raises(ValueError, match='arch'): DeepLabHeatmaps(arch='fcn')
    assert all(b.momentum == 0.1 for b in dl.modules() if isinstance(b, torch.nn.BatchNorm2d))   # not MobileNetV3's 0.01 (eval maps empty)
    sig = build_lvh_model('deeplabv3', size=32, deeplab_arch='deeplabv3_mobilenet_v3_large', deeplab_loss='focal_dice')
    assert sig.activation == 'sigmoid' and lvh_loss(sig).kind == 'focal_dice'
    with pytest.raises(ValueError, match='deeplab_loss'): build_lvh_model('deeplabv3', deeplab_loss='mse')


def test_loss_decreases():
    torch.manual_seed(0)
    img = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    tgt = torch.tensor([[[8., 9., 1.], [20., 12., 1.], [14., 25., 1.], [26., 26., 1.]]]).repeat(2, 1, 1)
    for model, loss in [(_vit(), HeatmapLoss('focal_dice', 2)), (DeepLabHeatmaps(4, 32, 'deeplabv3_mobilenet_v3_large'), HeatmapLoss('wmse', 2))]:
        opt, ls = torch.optim.AdamW(model.parameters(), 3e-3), []
        for _ in range(20):
            l = loss(model(img), tgt); opt.zero_grad(); l.backward(); opt.step(); ls.append(l.item())
        assert ls[-1] < 0.85 * ls[0], type(model).__name__

# --- the task -----------------------------------------------------------------------------------------------------------

def test_items_chain_the_calipers(lvh):
    items, ds = lvh
    ed = items[items.phase == 'ED']
    lm = item_landmarks(ed)
    for m, (a, b) in (('IVS', (0, 1)), ('LVID', (1, 2)), ('LVPW', (2, 3))):
        assert np.allclose(np.hypot(*(lm[:, b] - lm[:, a]).T), ed[f'{m}_px'], atol=0.02)
        assert np.allclose(ed[f'{m}_px'] * ed.mm_per_px, ed[f'{m}_mm'], atol=0.1)
    x, t = ds['train'][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and t.shape == (4, 3)
    p = np.array([[3.0, 100.0], [140.0, 5.5]])
    assert np.allclose(from_model(to_model(p, 128, 144, 32), 128, 144, 32), p)


def test_tiny_fit_and_evaluation(lvh, tmp_path):
    items, ds = lvh
    m = build_lvh_model('vit', size=32, feature_size=8, adapters=True, adapter_dim=16, depth=2)
    m, log = train_lvh(m, ds['train'], ds['val'], tmp_path/'fit', {'t': 1}, epochs=1, batch_size=8, lr=1e-3, workers=0)
    assert len(log) == 1 and (tmp_path/'fit'/'best.pth').exists()
    pred = predict_landmarks(m, ds['test'])
    assert pred.shape == (len(ds['test']), 4, 2)
    means, base = mean_baseline(items[items.split == 'train'], ds['train'], ds['test'])
    per = lvh_per_item(ds['test'].items, dict(model=pred, truth=item_landmarks(ds['test'].items)), means, base)
    assert np.allclose(per.le_LVID_truth.dropna(), 0) and per.le_LVID_mean.notna().any()
    s = lvh_summary(per, n_boot=50)
    for who in ('model', 'mean'):
        for m_ in MEASURES:
            assert f'{who}/mae_{m_.lower()}/mean' in s and f'{who}/le_{m_.lower()}/mean' in s and f'{who}/mae_{m_.lower()}_px/mean' in s
    assert 'model/r2/mean' in s and 'model/mae_lvid/vs_mean/p_wilcoxon' in s
    assert r2_score([1, 2, 3], [1, 2, 3]) == 1 and math.isnan(r2_score([1], [1]))
    with pytest.raises(ValueError, match='predictions'): lvh_per_item(ds['test'].items, dict(model=pred[:, :2]), means)
