"""The data path and the bench: the fast CPU augmentation against albumentations, `BatchAugment` against the CPU
path's keypoint maps, and the prepared GPU check (reduced, on the CPU)."""
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from echobook.data.clips import (AUGMENT_GROUPS, apply_augmentation, draw_augmentation, from_albumentations,
                                 landmark_augmentation, resize_frames, scale_keypoints)
from echobook.data.batch_augment import BatchAugment


def _smooth_clip(size=112, frames=16, seed=0):
    "A (T, size, size, 3) uint8 clip of smooth random blobs (frames differ), and (2, 40, 2) keypoints inside it."
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), size / 16)
    base = (base - base.min()) / (base.max() - base.min()) * 230 + 10
    clip = np.stack([np.roll(base, t, axis=1) for t in range(frames)]).astype(np.uint8)
    return clip, rng.uniform(0.2 * size, 0.8 * size, (2, 40, 2))


def _reference(seed, frames224, kp224, p=(1, 1, 1, 1)):
    "An albumentations run (the paper's augmentation) with its applied parameters."
    tf = landmark_augmentation(224, p=p, seed=seed)
    tf.save_applied_params = True
    return tf(images=frames224, keypoints=kp224.reshape(-1, 2).astype(np.float32))


@pytest.mark.parametrize('seed', range(6))
def test_fast_augmentation_matches_albumentations(seed):
    "Same parameters → the same keypoints (Affine exactly; crops within albumentations' 0.1 px rounding) and pixels."
    clip, kp = _smooth_clip()
    frames, kp224 = resize_frames(clip, 224), scale_keypoints(kp, 112, 224)
    ref = _reference(seed, frames, kp224)
    draw = from_albumentations(ref['applied_transforms'])
    kref = np.asarray(ref['keypoints']).reshape(kp.shape)
    f224, k224 = apply_augmentation(frames, kp224, draw, 224)          # from the 224² frames: the same pipeline
    f112, k112 = apply_augmentation(clip, kp, draw, 224)               # from the cached 112²: resize fused with the warp
    assert f224.shape == f112.shape == ref['images'].shape and f224.dtype == np.uint8
    np.testing.assert_allclose(k112, k224, atol=1e-6)
    tol = 1e-3 if draw['geometric'][0] == 'affine' else 0.11
    np.testing.assert_allclose(k224, kref, atol=tol)
    assert np.abs(f224.astype(int) - ref['images']).mean() < 0.6
    assert np.abs(f112.astype(int) - ref['images']).mean() < 1.5


def test_fast_augmentation_one_draw_for_all_frames():
    "Identical frames stay identical, whatever is drawn (the noise map too is shared by the frames)."
    clip = np.repeat(_smooth_clip()[0][:1], 8, 0)
    rng = np.random.default_rng(1)
    for _ in range(10):
        out, _ = apply_augmentation(clip, np.zeros((1, 2)), draw_augmentation(rng, 96, p=(1, 1, 1, 1)), 96)
        assert all(np.array_equal(f, out[0]) for f in out)


def test_draw_distribution():
    "Group probabilities and the kinds' shares as in `landmark_augmentation` (OneOf with equal weights)."
    rng = np.random.default_rng(0)
    draws = [draw_augmentation(rng, 224, noise_map=False) for _ in range(3000)]
    for (group, kinds), p in zip(AUGMENT_GROUPS.items(), (0.6, 0.6, 0.3, 0.3)):
        got = pd.Series([d[group][0] if d[group] else None for d in draws])
        assert abs(got.notna().mean() - p) < 0.03, group
        for k in kinds: assert abs((got == k).mean() - p / len(kinds)) < 0.03, (group, k)
    ks = [d['blur'][1]['ksize'] for d in draws if d['blur'] and d['blur'][0] == 'gaussian']
    assert abs(np.mean(np.array(ks) == 3) - 1 / 3) < 0.07


def test_batch_augment_matches_cpu_keypoints_and_pixels():
    "Given the CPU path's draws, BatchAugment moves keypoints identically and gives nearly the same pixels."
    clips = [_smooth_clip(32, 4, s) for s in range(6)]
    x = torch.stack([torch.from_numpy(c).permute(3, 0, 1, 2) for c, _ in clips])
    y = torch.stack([torch.as_tensor((k + 0.5) / 32, dtype=torch.float32) for _, k in clips])
    rng = np.random.default_rng(2)
    draws = [draw_augmentation(rng, 64, p=(1, 1, 1, 1)) for _ in clips]
    xa, ya = BatchAugment(size=64).augment_batch(x, y, draws)
    assert xa.shape == (6, 3, 4, 64, 64) and xa.dtype == torch.uint8 and ya.shape == y.shape
    for i, (c, k) in enumerate(clips):
        f, kc = apply_augmentation(c, k, draws[i], 64)
        np.testing.assert_allclose(ya[i].double().numpy() * 64 - 0.5, kc, atol=1e-3)
        assert (xa[i].permute(1, 2, 3, 0).int() - torch.from_numpy(f).int()).abs().float().mean() < 2.5, draws[i]


def _dots(kp, size, sigma=1.5):
    "A size×size image with a Gaussian dot at each normalised keypoint of kp (n, 2)."
    g = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing='ij')
    return sum(torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in (kp.double() * size - 0.5).tolist())


def test_batch_augment_keypoints_follow_dots():
    "A dot drawn at each keypoint ends where BatchAugment says the keypoint went."
    g = torch.Generator().manual_seed(0)
    kp = torch.stack([torch.stack([torch.tensor([0.3, 0.5, 0.7]) + 0.05 * torch.rand(3, generator=g),
                                   0.35 + 0.3 * torch.rand(3, generator=g)], -1) for _ in range(6)])[:, None]   # (6, 1, 3, 2)
    x = torch.stack([(_dots(k[0], 48) * 200).clamp(0, 255)[None, None].expand(3, 2, 48, 48) for k in kp]).float()
    out, ko = BatchAugment(p=(1, 0, 0, 0), size=72, seed=3).augment_batch(x, kp)
    yy, xx = torch.meshgrid(torch.arange(72.), torch.arange(72.), indexing='ij')
    for i in range(6):
        img = out[i, 0, 0].double()
        for u in ko[i, 0]:
            px, py = (u.double() * 72 - 0.5).tolist()
            w = img * (((xx - px) ** 2 + (yy - py) ** 2) < 36)
            c = torch.stack([(w * xx).sum(), (w * yy).sum()]) / w.sum()
            assert (c - torch.tensor([px, py])).abs().max() < 0.35


def test_batch_augment_callback_training_only():
    "In a Learner, the callback replaces training batches (before the forward pass) and leaves validation alone."
    x, y = torch.randint(0, 256, (4, 3, 2, 16, 16), dtype=torch.uint8), torch.rand(4, 2, 40, 2)
    cb = BatchAugment(p=(1, 1, 0, 0), seed=0)
    cb.learn = SimpleNamespace(xb=(x,), yb=(y,), training=False)
    cb('before_batch')
    assert cb.learn.xb[0] is x and cb.learn.yb[0] is y
    cb.learn.training = True
    cb('before_batch')
    assert cb.learn.xb[0].shape == x.shape and not torch.equal(cb.learn.yb[0], y)
    with pytest.raises(ValueError, match='square clips'): cb.augment_batch(x[..., :8], y)


def test_gpu_check_targets_and_smoke_rows(tmp_path, monkeypatch):
    "The report's targets from a synthetic H100 report, and the table3 smoke rows taken from `smoke_table`."
    from echobook.bench import gpu_check as gc
    rep = dict(machine=dict(gpu='NVIDIA H100 80GB HBM3'), data=[dict(path='cache+augment', workers=8, size=224, clips_per_s=400.0)],
               stages=[], smoke=[dict(id='a', status='ok'), dict(id='b', status='failed')],
               throughput=[dict(encoder='mvit_v2_s.echoprime', status='ok', train_clips_per_s=160.0, variant='compiled, contiguous',
                                size=224, batch=20, dtype='bf16 autocast')])
    t = {r['target'].split(' ')[0]: r for r in gc.gpu_targets(rep)}
    assert t['MViT-v2-S']['passed'] is True and t['data']['passed'] is True and t['table3']['passed'] is False
    import echobook.sweeps as sw
    calls = []
    monkeypatch.setattr(sw, 'smoke_table', lambda table, **kw: calls.append((table, kw)) or pd.DataFrame([dict(id='x', status='ok', step_s=1.0)]),
                        raising=False)
    rows, note = gc.smoke_rows('cpu', tmp_path, reduced=True, deadline=float('inf'))
    assert rows == [dict(id='x', status='ok', step_s=1.0)] and calls[0][0] == 'table3' and calls[0][1]['limit'] == 1 and note


@pytest.mark.slow
def test_gpu_check_reduced_on_cpu(tmp_path):
    "`gpu_check(device='cpu', reduced=True)` writes the report (Markdown + JSON) with every section."
    from echobook.bench.gpu_check import gpu_check
    md = gpu_check('cpu', tmp_path/'gc', reduced=True, progress=False)
    rep = json.loads((tmp_path/'gc'/'report.json').read_text())
    text = md.read_text()
    for section in ('### Targets', '### Training throughput', '### Peak training memory vs k', '### Data', '### table3 smoke'):
        assert section in text, section
    assert rep['throughput'][0]['status'] == 'ok' and len(rep['memory_vs_k']) == 2 and rep['stages']


_FORKED_LOADER = '''
import sys, cv2, numpy as np
from pathlib import Path
from echobook.data.echonet import ensure_phantom
from echobook.data.clips import EchoClips, prepare_cache
from echobook.bench.measure import loader_rate
from echobook.training import make_dataloaders
root = Path(sys.argv[1])
cache = prepare_cache(ensure_phantom(root/'phantom', n_videos=8, progress=False), root/'cache', progress=False)
big = np.zeros((1500, 1500, 3), np.uint8)
for _ in range(3): cv2.resize(big, (2500, 2500))            # the parent has started OpenCV's thread pool
ds = EchoClips(cache, 'TRAIN', size=32, augment=True, channels=1)
assert loader_rate(ds, workers=1, batch_size=2)['clips'] == len(ds)
dls = make_dataloaders(ds, ds, batch_size=2, workers=1, device='cpu')
assert sum(len(x) for x, _ in dls.train) >= len(ds) - 1
print('ok')
'''

def test_forked_data_workers_do_not_hang(tmp_path):
    "Data workers forked after the parent used OpenCV's thread pool finish (setting OpenCV's threads inside such a worker hangs it)."
    import subprocess, sys
    r = subprocess.run([sys.executable, '-c', _FORKED_LOADER, str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-2000:]
