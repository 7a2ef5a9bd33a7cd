"""Data-parallel training (`fit(devices=2)`: 2 processes, gloo, on the CPU) of a tiny landmark configuration: every
training item is seen exactly once per epoch across the ranks, the run leaves the files of a one-device run, an
interrupted run resumes where it stopped and finishes, the caller's model ends at the best weights; and smoke mode
(`smoke_steps`): `smoke.json` and nothing a real run could resume."""
import json, os, signal, sys
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from echobook.core import ResumeError
from echobook.data.clips import prepare_cache
from echobook.training import EpochSeed, drop_last_batch, read_checkpoint, smoke_steps

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the ranks get this module's classes by value

SMALL = dict(encoder='resnet18_2d.in1k', head='mlp', k=8, augment=True)
PROFILE = dict(size=32, frames=4, epochs=2, batch_size=4, lr=5e-4, warmup_epochs=0)
FILES = ['best.pth', 'checkpoint.pth', 'log.csv']


class Recorded(torch.utils.data.Dataset):
    "A dataset that appends '<epoch> <index>' to `<folder>/<pid>.txt` for every item it hands out."
    def __init__(self, ds, folder): self.ds, self.folder, self.epoch = ds, Path(folder), None
    def __len__(self): return len(self.ds)
    @property
    def tf(self): return self.ds.tf
    def __getitem__(self, i):
        with open(self.folder/f'{os.getpid()}.txt', 'a') as f: f.write(f'{self.epoch} {i}\n')
        return self.ds[i]


class TagEpoch(Callback):
    "Tell the recorded training set which epoch (of the whole run, resumed or not) is running."
    def before_epoch(self):
        offset = next(c.epoch_offset for c in self.learn.cbs if isinstance(c, EpochSeed))
        self.dls.train.dataset.epoch = self.epoch + offset


class KillRank1(Callback):
    "SIGKILL rank 1 after its first step of epoch 1 (rank 0 has written epoch 0's checkpoint by then)."
    def after_batch(self):
        if self.training and self.learn.rank == 1 and self.epoch == 1 and self.iter == 0: os.kill(os.getpid(), signal.SIGKILL)


def _config(**overrides) -> dict:
    from echobook.config import load_profile
    return dict(SMALL, seed=0, **load_profile('landmarks', 'tiny', **{**PROFILE, **overrides}))


def _train(cache, folder, devices, record=None, cbs=(), **overrides):
    "Train the small landmark model in `folder` on `devices`; (model, train set size)."
    from echobook.tasks.landmarks import build_landmark_model, landmark_datasets, mean_shape_normalised, train_landmarks
    cfg = dict(_config(**overrides), devices=devices)
    train, valid, _ = landmark_datasets(cache, seed=0, size=cfg['size'], augment=cfg['augment'])
    torch.manual_seed(0)
    model = build_landmark_model(cfg['encoder'], cfg['head'], k=cfg['k'], size=cfg['size'], frames=cfg['frames'],
                                 mean_shape=mean_shape_normalised(train))
    if record: train, cbs = Recorded(train, record), [TagEpoch(), *cbs]
    train_landmarks(model, train, valid, folder, cfg, device='cpu', progress=False, cbs=cbs)
    return model, len(train)


def _seen(folder) -> pd.DataFrame:
    "Items handed out, one row each: pid, epoch, index."
    rows = [(p.stem, *map(int, line.split())) for p in Path(folder).glob('*.txt') for line in p.read_text().splitlines()]
    return pd.DataFrame(rows, columns=['pid', 'epoch', 'index'])


@pytest.fixture(scope='module')
def cache(phantom_dir, tmp_path_factory):
    return prepare_cache(phantom_dir, tmp_path_factory.mktemp('ddp')/'cache', n_frames=4, progress=False)


@pytest.fixture(scope='module')
def interrupted(cache, tmp_path_factory):
    "A 2-process run whose rank 1 is SIGKILLed in epoch 1, then resumed on 2 processes: (folder, records, model, n)."
    root = tmp_path_factory.mktemp('interrupted')
    (root/'seen1').mkdir(); (root/'seen2').mkdir()
    with pytest.raises(Exception):       # EchobookError '... rank 1 ... died (... SIGKILL)' (or rank 0's broken-pipe error)
        _train(cache, root/'run', 2, record=root/'seen1', cbs=[KillRank1()])
    first = dict(files=sorted(p.name for p in (root/'run').iterdir()), log=pd.read_csv(root/'run'/'log.csv'))
    model, n = _train(cache, root/'run', 2, record=root/'seen2')
    return root/'run', first, _seen(root/'seen1'), _seen(root/'seen2'), model, n


def test_each_item_once_per_epoch_across_ranks(interrupted):
    folder, _, seen1, seen2, _, n = interrupted
    bs = PROFILE['batch_size']
    expected = n - (n % bs if drop_last_batch(n, bs, devices=2) else 0)
    epoch0, epoch1 = seen1[seen1.epoch == 0], seen2[seen2.epoch == 1]
    for seen in (epoch0, epoch1):
        assert seen.pid.nunique() == 2, 'both ranks must train'
        assert len(seen) == expected == seen['index'].nunique(), (n, expected, len(seen), seen['index'].nunique())
        assert seen['index'].between(0, n - 1).all()
        by_rank = [set(g) for _, g in seen.groupby('pid')['index']]
        assert not by_rank[0] & by_rank[1] and abs(len(by_rank[0]) - len(by_rank[1])) <= 1


def test_interrupted_run_resumes_and_finishes(interrupted):
    folder, first, seen1, seen2, model, _ = interrupted
    assert first['files'] == FILES and first['log'].epoch.tolist() == [0], first      # died in epoch 1, after epoch 0's files
    assert set(seen2.epoch) == {1}, 'the resumed run must continue at epoch 1, not restart'
    state = read_checkpoint(folder, dict(_config(), devices=2))
    assert state['epoch'] == PROFILE['epochs'] - 1
    log = pd.read_csv(folder/'log.csv')
    assert log.epoch.tolist() == [0, 1] and log.valid_loss.notna().all() and log.train_loss.notna().all()
    best = torch.load(folder/'best.pth', map_location='cpu')
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items()), "the caller's model must hold best.pth"


def test_two_devices_leave_the_files_of_one(cache, interrupted, tmp_path):
    "The same files as a one-device fit (which files `fit` writes does not depend on the model: a linear one here)."
    from torch import nn
    from echobook.training import fit
    folder, ds = interrupted[0], torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    fit(nn.Linear(2, 1), ds, ds, tmp_path/'one', config={}, epochs=1, loss_func=nn.functional.mse_loss, lr=0.1, batch_size=4, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path/'one').iterdir()) == FILES
    with pytest.raises(ResumeError, match='differs in: lr'):          # refused before any process starts
        _train(cache, folder, 2, lr=1e-3)


def test_smoke_run_writes_smoke_json_and_nothing_resumable(cache, tmp_path):
    with smoke_steps(3):
        _train(cache, tmp_path/'run', 1)
    assert sorted(p.name for p in (tmp_path/'run').iterdir()) == ['smoke.json']
    smoke = json.loads((tmp_path/'run'/'smoke.json').read_text())
    assert (smoke['steps'], smoke['timed_steps'], smoke['batch_size'], smoke['items_per_step']) == (3, 2, 4, 4)
    assert (smoke['device'], smoke['precision'], smoke['devices']) == ('cpu', 'fp32', 1)
    assert 1 <= smoke['valid_batches'] <= 3 and smoke['step_s'] > 0 and smoke['peak_mem_bytes'] > 0
    assert read_checkpoint(tmp_path/'run', _config()) is None
