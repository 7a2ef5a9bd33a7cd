"""EchoApex-SAM (paper 001, Section 2.3, Methods A.3): shapes for every prompt, the decoder responding to each prompt
kind, adapters training only what they should, prompts from masks, the multi-forward loss and its weighting, a tiny
overfit, and the error messages. Random init only (no weights are downloaded); each test takes seconds on one core."""
import tempfile
from pathlib import Path
import pytest
import torch
from monai.losses import DiceCELoss

from echobook.core import MissingWeightsError
from echobook.models.freezing import add_adapters
from echobook.models.sam import (CLIP_TEXT_TAG, ClipText, SamOutput, build_sam_segmenter, corrective_points,
                                 multi_forward_loss, prompts_from_mask)

torch.set_num_threads(1)
S = 64


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return build_sam_segmenter(size=S).eval()


@pytest.fixture(scope='module')
def masks():
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing='ij')
    return torch.stack([(yy - 32) ** 2 + (xx - 26) ** 2 < 14 ** 2, (yy >= 16) & (yy < 44) & (xx >= 24) & (xx < 54)])


def _x(model, b=2):
    return model.normalize(torch.randint(0, 256, (b, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))


def test_shapes_every_prompt(model):
    x = _x(model)
    pts = (torch.tensor([[[10., 12.]], [[50., 40.]]]), torch.ones(2, 1, dtype=torch.long))
    box = torch.tensor([[4., 4, 30, 30], [20, 16, 60, 50]])
    with torch.no_grad():
        first = model(x, points=pts)
        outs = [first, model(x, boxes=box), model(x, texts=['left ventricle', 'left atrium']),
                model(x, points=pts, boxes=box, texts=['lv', 'la'], mask_input=first.low_res),
                model(x, mask_input=torch.randn(2, 1, S // 4, S // 4)), model(x)]
    for o in outs:
        assert isinstance(o, SamOutput)
        assert (o.logits.shape, o.low_res.shape, o.iou.shape) == ((2, 1, S, S), (2, 1, S // 2, S // 2), (2, 1))
    assert model.low_res_size == (S // 2, S // 2)


def test_normalize(model):
    u8 = torch.full((1, 3, S, S), 255, dtype=torch.uint8)
    ref = model.normalize(u8)
    assert torch.allclose(model.normalize(torch.ones(1, 3, S, S), scale=1.), ref)
    assert torch.allclose(model.normalize(torch.full((1, 1, S, S), 255.)), ref)   # grey broadcasts
    assert torch.allclose(ref[0, :, 0, 0], (255 - model.mean.flatten()) / model.std.flatten())


@pytest.mark.parametrize('kind', ['point', 'box', 'text'])
def test_decoder_responds_to_prompt(model, kind):
    img = _x(model, 1)
    a, b = dict(point=[dict(points=(torch.tensor([[[8., 8.]]]), torch.ones(1, 1, dtype=torch.long))),
                       dict(points=(torch.tensor([[[56., 56.]]]), torch.ones(1, 1, dtype=torch.long)))],
                box=[dict(boxes=torch.tensor([[2., 2., 20., 20.]])), dict(boxes=torch.tensor([[30., 30., 62., 62.]]))],
                text=[dict(texts=['left ventricle']), dict(texts=['right atrium'])])[kind]
    with torch.no_grad():
        la, lb, la2 = model(img, **a).logits, model(img, **b).logits, model(img, **a).logits
    assert torch.allclose(la, la2)
    assert (la - lb).abs().mean() > 0.01 * la.abs().mean()


def test_adapters_train_only_adapters_neck_prompt_decoder_textproj():
    m = build_sam_segmenter(size=S, adapters=8)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n.split('.')[0] for n in trainable} == {'encoder', 'neck', 'prompt_encoder', 'mask_decoder', 'text_proj'}
    enc = {n for n in trainable if n.startswith('encoder.')}
    assert enc == {f'encoder.model.blocks.{i}.adapter.{l}.{w}' for i in range(12) for l in ('down', 'up') for w in ('weight', 'bias')}
    assert 'prompt_encoder.mask_downscaling.7.weight' in trainable and 'prompt_encoder.mask_downscaling.8.weight' in trainable
    assert not any(p.requires_grad for p in m.text.parameters())
    m.train()
    assert not m.text.training and m.encoder.model.blocks[0].training and not m.encoder.model.patch_embed.training
    # without adapters everything but CLIP trains (seed 001 line 826)
    full = build_sam_segmenter(size=S)
    assert {n.split('.')[0] for n, p in full.named_parameters() if not p.requires_grad} == {'text'}


def test_adapters_start_as_the_encoder():
    torch.manual_seed(1)
    m = build_sam_segmenter(size=S, text=False).eval()
    x = torch.randn(1, 3, S, S)
    with torch.no_grad(): before = m.embed(x)
    add_adapters(m.encoder, 8)                              # zero-initialised `up`: the adapted encoder is the encoder
    with torch.no_grad(): assert torch.allclose(m.embed(x), before, atol=1e-5)
    assert all(not p.requires_grad for n, p in m.encoder.named_parameters() if '.adapter.' not in n)


def test_prompts_from_mask(masks):
    g = torch.Generator().manual_seed(0)
    coords, labels = prompts_from_mask(masks, 'point', n_points=4, rng=g)['points']
    assert coords.shape == (2, 4, 2) and labels.tolist() == [[1] * 4] * 2
    assert all(masks[b, int(y), int(x)] for b in range(2) for x, y in coords[b])
    exact = torch.tensor([[13., 19., 39., 45.], [24., 16., 53., 43.]])
    assert torch.equal(prompts_from_mask(masks, 'box')['boxes'], exact)
    for _ in range(5):
        jb = prompts_from_mask(masks, 'box', rng=g, jitter=0.15)['boxes']
        assert ((jb - exact).abs() <= 0.15 * 30 + 1e-4).all() and (jb[:, 2:] >= jb[:, :2]).all() and (jb >= 0).all() and (jb <= S - 1).all()
    assert prompts_from_mask(masks, 'text', names=['left ventricle', 'left atrium']) == dict(texts=['left ventricle', 'left atrium'])
    # text prompts accept an empty target
    assert prompts_from_mask(masks & False, 'text', names=['a', 'b'])['texts'] == ['a', 'b']


def test_prompt_errors(masks):
    with pytest.raises(ValueError, match=r"one of \('point', 'box', 'text'\)"): prompts_from_mask(masks, 'scribble')
    with pytest.raises(ValueError, match=r'masks \[1\] are empty'): prompts_from_mask(torch.stack([masks[0], masks[0] & False]), 'point')
    with pytest.raises(ValueError, match='needs names'): prompts_from_mask(masks, 'text')
    with pytest.raises(ValueError, match='needs names'): prompts_from_mask(masks, 'text', names='left ventricle')
    with pytest.raises(ValueError, match=r'\(B, H, W\)'): prompts_from_mask(masks[0], 'box')


def test_model_errors(model):
    x = _x(model)
    with pytest.raises(ValueError, match=r'\(B, 3, 64, 64\)'): model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match='list of B=2 strings'): model(x, texts='left ventricle')
    with pytest.raises(ValueError, match=r'\(B, 4\)'): model(x, boxes=torch.zeros(2, 2))
    with pytest.raises(ValueError, match='coords'): model(x, points=(torch.zeros(2, 1, 3), torch.ones(2, 1)))
    with pytest.raises(ValueError, match='mask_input'): model(x, mask_input=torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match='text=True'): build_sam_segmenter(size=S, text=False)(x, texts=['a', 'b'])
    with pytest.raises(ValueError, match='not a timm ViT'): build_sam_segmenter('resnet18_2d.in1k', size=S)
    with pytest.raises(ValueError, match='text tower must be one of'): ClipText('huge')
    with pytest.raises(ValueError, match='forwards >= 1'): multi_forward_loss(model, x, torch.ones(2, S, S, dtype=torch.bool), 'box', forwards=0)


def test_missing_weights_name_the_file():
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(MissingWeightsError, match=f'{d}/{CLIP_TEXT_TAG}/open_clip_model.safetensors'):
            ClipText('ViT-B-16', pretrained=True, weights_dir=d)
        with pytest.raises(MissingWeightsError, match='vit_small_patch8_224.dino/model.safetensors'):
            build_sam_segmenter(size=S, pretrained=True, weights_dir=d)


def test_clip_checkpoint_round_trip():
    src = ClipText('tiny')
    with tempfile.TemporaryDirectory() as d:
        (Path(d)/CLIP_TEXT_TAG).mkdir()
        torch.save({**src.clip.state_dict(), 'visual.proj': torch.zeros(3)}, Path(d)/CLIP_TEXT_TAG/'open_clip_pytorch_model.bin')
        dst = ClipText('tiny', pretrained=True, weights_dir=d)
        assert torch.allclose(dst(['left ventricle', 'mitral valve']), src(['left ventricle', 'mitral valve']))
    with tempfile.TemporaryDirectory() as d:                # a checkpoint of another model is refused, naming the file
        (Path(d)/CLIP_TEXT_TAG).mkdir()
        torch.save({'token_embedding.weight': torch.zeros(3)}, Path(d)/CLIP_TEXT_TAG/'open_clip_pytorch_model.bin')
        with pytest.raises(ValueError, match='open_clip_pytorch_model.bin does not fit'): ClipText('tiny', pretrained=True, weights_dir=d)


def test_corrective_points(masks):
    c, l = corrective_points(torch.where(masks, -1., 1.)[:, None], masks, torch.Generator().manual_seed(1))  # all wrong
    assert c.shape == (2, 1, 2) and all(bool(masks[b, int(c[b, 0, 1]), int(c[b, 0, 0])]) == bool(l[b, 0]) for b in range(2))
    only_fp = torch.where(masks, 5., 5.)[:, None]           # predicts everything: errors are false positives, label 0
    assert corrective_points(only_fp, masks)[1].tolist() == [[0], [0]]
    only_fn = torch.full_like(only_fp, -5.)                  # predicts nothing: errors are false negatives, label 1
    assert corrective_points(only_fn, masks)[1].tolist() == [[1], [1]]
    assert corrective_points(torch.where(masks, 5., -5.)[:, None], masks)[1].tolist() == [[-1], [-1]]  # exact: not a point


def test_multi_forward_loss_is_the_normalised_decayed_sum(model, masks):
    x, crit, t = _x(model), DiceCELoss(sigmoid=True, lambda_dice=1., lambda_ce=1.), masks[:, None].float()
    with torch.no_grad():
        got = multi_forward_loss(model, x, masks, 'box', forwards=3, decay=0.5, rng=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        kw = prompts_from_mask(masks, 'box', rng=g)
        o0 = model(x, **kw)
        c, l = corrective_points(o0.logits, masks, g)
        o1 = model(x, **kw, points=(c, l), mask_input=o0.low_res)
        c2, l2 = corrective_points(o1.logits, masks, g)
        o2 = model(x, **kw, points=(torch.cat([c, c2], 1), torch.cat([l, l2], 1)), mask_input=o1.low_res)
        want = (crit(o0.logits, t) + 0.5 * crit(o1.logits, t) + 0.25 * crit(o2.logits, t)) / 1.75
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(multi_forward_loss(model, x, masks, 'box', forwards=1), crit(model(x, **prompts_from_mask(masks, 'box')).logits, t), atol=1e-5)


@pytest.mark.parametrize('kind', ['point', 'text'])
def test_multi_forward_loss_backprops(kind, masks):
    torch.manual_seed(0)
    m = build_sam_segmenter(size=S, adapters=8).train()
    loss = multi_forward_loss(m, _x(m), masks, kind, names=['left ventricle', 'left atrium'], rng=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert m.text_proj.weight.grad is not None if kind == 'text' else m.text_proj.weight.grad is None
    assert m.mask_decoder.iou_prediction_head.layers[0].weight.grad is None   # CE + Dice only: the IoU head is not trained
    assert m.encoder.model.blocks[0].adapter.up.weight.grad.abs().sum() > 0
    assert m.prompt_encoder.mask_downscaling[7].weight.grad.abs().sum() > 0   # later forwards use the mask embedding


def test_tiny_overfit(masks):
    torch.manual_seed(0)
    net = build_sam_segmenter(size=S, text=False).train()
    images = net.normalize(masks[:, None].float() * 180 + 30)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.005)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(15):
        loss = multi_forward_loss(net, images, masks, 'box', rng=g)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
