"""Continual pretraining (paper 001, Sec. 2.1 / A.1): DINOv1 and DINOv2 losses are finite, the EMA teacher has no
gradients and moves, a fit step runs through `echobook.training.fit`, a fit interrupted after its first checkpoint
resumes to the same weights, a 2-process (gloo, CPU) fit sees as many samples per epoch as one process, and the
written weights load as a registry encoder (`vit_small_patch8_224.echoapex`)."""
import os, sys
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the ranks get this module's classes by value

TINY = dict(depth=1, frames_per_video=1, batch_size=8, s1_epochs=2, s2_epochs=1, knn_every=2, out_dim=64, hidden_dim=32,
            bottleneck_dim=16, ibot_out_dim=64, ibot_hidden_dim=32, seed=0)


def _cfg(**kw) -> dict:
    from echobook.config import load_profile
    from echobook.tasks.pretrain import pretrain_config
    return pretrain_config({**load_profile('pretrain', 'tiny'), **TINY, **kw})


@pytest.fixture(scope='module')
def views(tmp_path_factory):
    from echobook.data.view_phantom import ensure_view_phantom
    return ensure_view_phantom(tmp_path_factory.mktemp('pre')/'views', sequences=dict(train=20, T1=10), size=48, frames=(4, 5), progress=False)


def _train_ds(views, cfg):
    from echobook.tasks.pretrain import EchoFrames, dino_transform, frame_index
    return EchoFrames(frame_index(views/'train', frames_per_video=cfg['frames_per_video']), cfg['frame_size'],
                      dino_transform(cfg['size'], cfg['local_size'], cfg['n_local'], cfg['global_scale'], cfg['local_scale']))


def _model(cfg, stage=1):
    from echobook.tasks.pretrain import dino_model
    torch.manual_seed(0)
    return dino_model(cfg, stage)


def _batch(views, cfg, n=4):
    ds = _train_ds(views, cfg)
    items = [ds[i][0] for i in range(n)]
    return [torch.stack([it[j] for it in items]) for j in range(len(items[0]))]


@pytest.mark.parametrize('stage', [1, 2])
def test_losses_finite_and_teacher_without_grads(views, stage):
    torch.set_num_threads(1)
    cfg = _cfg()
    m = _model(cfg, stage)
    loss = m(_batch(views, cfg))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(not p.requires_grad and p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())


def test_sinkhorn_and_mean_centering_both_run(views):
    cfg = _cfg(centering='mean')
    assert torch.isfinite(_model(cfg, 2)(_batch(views, cfg)))


def test_fit_step_moves_the_ema_teacher(views, tmp_path):
    "One epoch through `echobook.training.fit`: the teacher changes (EMA of the student) without ever having gradients."
    from echobook.tasks.pretrain import fit_stage
    torch.set_num_threads(1)
    cfg = _cfg(s1_epochs=1)
    m = _model(cfg)
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    fit_stage(m, _train_ds(views, cfg), tmp_path/'s1', cfg, 1)
    moved = [k for k, v in m.teacher.state_dict().items() if 'vit.blocks' in k and not torch.equal(v, before[k])]
    assert moved and all(p.grad is None for p in m.teacher.parameters())
    log = pd.read_csv(tmp_path/'s1'/'log.csv')
    assert log.train_loss.notna().all() and len(log) == 1


class Crash(Callback):
    "Die in epoch 1 (after epoch 0's checkpoint), like a killed process."
    def before_batch(self):
        if self.training and self.epoch + self.learn.epoch_seed.epoch_offset == 1: raise RuntimeError('killed')


def test_interrupted_fit_resumes_to_the_same_weights(views, tmp_path):
    from echobook.tasks.pretrain import fit_stage, knn_set
    torch.set_num_threads(1)
    cfg = _cfg()
    kset = knn_set(views, cfg['frame_size'], frames_per_sequence=1)
    ref = _model(cfg); fit_stage(ref, _train_ds(views, cfg), tmp_path/'ref', cfg, 1, kset)
    with pytest.raises(RuntimeError, match='killed'):
        fit_stage(_model(cfg), _train_ds(views, cfg), tmp_path/'run', cfg, 1, kset, cbs=[Crash()])
    assert torch.load(tmp_path/'run'/'checkpoint.pth', weights_only=False)['epoch'] == 0
    resumed = _model(cfg); fit_stage(resumed, _train_ds(views, cfg), tmp_path/'run', cfg, 1, kset)
    a, b = [torch.load(tmp_path/d/'checkpoint.pth', weights_only=False)['model'] for d in ('ref', 'run')]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in ref.state_dict().items())
    best = torch.load(tmp_path/'ref'/'best.pth', weights_only=False)   # `KeepLast`: the kept weights are the last epoch's
    assert all(torch.equal(best[k], a[k]) for k in a)
    k_ref, k_run = pd.read_csv(tmp_path/'ref'/'knn.csv'), pd.read_csv(tmp_path/'run'/'knn.csv')
    assert k_ref.step.tolist() == k_run.step.tolist() and k_ref.knn_acc.tolist() == k_run.knn_acc.tolist()


class Recorded(torch.utils.data.Dataset):
    "A dataset that appends '<epoch> <index>' to `<folder>/<pid>.txt` for every item it hands out."
    def __init__(self, ds, folder): self.ds, self.folder, self.epoch = ds, Path(folder), None
    def __len__(self): return len(self.ds)
    def __getitem__(self, i):
        with open(self.folder/f'{os.getpid()}.txt', 'a') as f: f.write(f'{self.epoch} {i}\n')
        return self.ds[i]


class TagEpoch(Callback):
    def before_epoch(self): self.dls.train.dataset.epoch = self.epoch + self.learn.epoch_seed.epoch_offset


def _seen(folder) -> pd.DataFrame:
    rows = [(p.stem, *map(int, line.split())) for p in Path(folder).glob('*.txt') for line in p.read_text().splitlines()]
    return pd.DataFrame(rows, columns=['pid', 'epoch', 'index'])


@pytest.mark.timeout(900)
def test_two_processes_see_the_samples_of_one(views, tmp_path):
    "`fit(devices=2)` over 2 CPU processes (gloo): both ranks train, and an epoch hands out as many items as on one process."
    from echobook.tasks.pretrain import fit_stage
    torch.set_num_threads(1)
    cfg = _cfg(s1_epochs=1)
    seen = {}
    for devices in (1, 2):
        (tmp_path/f'seen{devices}').mkdir()
        ds = Recorded(_train_ds(views, cfg), tmp_path/f'seen{devices}')
        fit_stage(_model(cfg), ds, tmp_path/f'run{devices}', cfg, 1, devices=devices, cbs=[TagEpoch()])
        seen[devices] = _seen(tmp_path/f'seen{devices}')
    one, two = seen[1], seen[2]
    assert two.pid.nunique() == 2 and len(two) == len(one) and two['index'].nunique() == one['index'].nunique()
    assert pd.read_csv(tmp_path/'run2'/'log.csv').train_loss.notna().all()


def test_written_weights_load_as_a_registry_encoder(tmp_path):
    from echobook.core import MissingWeightsError
    from echobook.models.encoders import save_echoapex
    from echobook.models.encoders import create_encoder, list_encoders
    assert {'vit_small_patch8_224.echoapex', 'vit_base_patch14_dinov2.echoapex'} <= set(list_encoders('*.echoapex'))
    m = _model(_cfg())
    path = save_echoapex(m.teacher_vit, 'vit_small_patch8_224', tmp_path)
    enc = create_encoder('vit_small_patch8_224.echoapex', pretrained=True, weights_dir=tmp_path, size=48, frames=1)
    assert enc.spec.loaded_from == str(path) and len(enc.blocks()) == 1
    sd = enc.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.teacher_vit.state_dict().items() if k != 'pos_embed')
    with pytest.raises(MissingWeightsError, match='vit_small_patch8_224.echoapex/model.safetensors'):
        create_encoder('vit_small_patch8_224.echoapex', pretrained=True, weights_dir=tmp_path/'none')


def test_pretrained_vit_serves_the_ef_experiment(tmp_path):
    "The EF experiment's frozen encoder (echobook.tasks.ef.frozen_encoder) takes the checkpoint pretraining writes."
    import timm
    from echobook.models.encoders import save_echoapex
    from echobook.tasks.ef import frozen_encoder
    vit = timm.create_model('vit_small_patch8_224.dino', pretrained=False, img_size=32, depth=2)
    save_echoapex(vit, 'vit_small_patch8_224', tmp_path)
    enc = frozen_encoder('vit_small_patch8_224.echoapex', pretrained=True, weights_dir=tmp_path, size=32, frames=2)
    assert torch.equal(enc.model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.embed_frames(torch.rand(1, 3, 2, 32, 32) * 255).shape == (1, 2, 384)
