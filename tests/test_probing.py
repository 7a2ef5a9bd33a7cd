"""Paper 002 (probing vs fine-tuning): the experiment notebook run with papermill on a small phantom, the registry complete
at import, DINOv2's feature (class token ⊕ mean patch token), the supervised ResNet-50 comparator of every configuration,
the paper profile's guards, and embeddings that follow the data."""
import json
from pathlib import Path
import pandas as pd
import pytest

REPO = Path(__file__).parents[1]
NB = REPO/'nbs'/'experiments'/'probing.ipynb'
TINY = dict(encoder='resnet18_2d.in1k', size=32, profile='tiny')  # the smallest registered image encoder, 32 px
PAPER_002 = {'vit_base_patch14_dinov2.lvd142m', 'vit_small_patch14_dinov2.lvd142m', 'vit_base_patch16_clip_224.openai',
             'vit_base_patch16_224.mae', 'resnet50.a1_in1k', 'convnext_base.echoclip'}


@pytest.fixture(scope='module')
def views_dir(tmp_path_factory):
    "A small phantom view data set (10 classes; train, T1, T2), shared by the tests of this module."
    from echobook.data.views import make_view_phantom
    return make_view_phantom(tmp_path_factory.mktemp('views')/'views', dict(train=60, T1=30, T2=20), size=64, frames=(8, 10),
                             progress=False)


def _run(tmp_path, views_dir, **params):
    import papermill as pm
    rd = tmp_path/'run'
    pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), kernel_name='echobook', cwd=str(tmp_path), progress_bar=False,
                        parameters=dict(data_dir=str(views_dir), cache_dir=str(tmp_path/'cache'), run_dir=str(rd), **{**TINY, **params}))
    return rd


def test_registry_complete_at_import():
    "The registry lists paper 002's encoders; the fresh-interpreter check (no import order) runs in nbs/02_models.encoders."
    from echobook.core import MissingWeightsError
    from echobook.models import encoders
    names = encoders.list_encoders()
    assert PAPER_002 <= set(names) and {'mvit_v2_s.echoprime', 'resnet18_2d.in1k', 'panecho.panecho'} <= set(names), names
    assert encoders.MissingWeightsError is MissingWeightsError


def test_dino_vit_s8_entry(tmp_path):
    "DINO ViT-S/8 (paper 001's EchoApex-S initialisation): 384-d class token, 12 blocks, ImageNet statistics, a clear missing-file error."
    import torch
    from echobook.core import MissingWeightsError
    from echobook.models.encoders import create_encoder, IMAGENET_MEAN
    enc = create_encoder('vit_small_patch8_224.dino', size=32).eval()
    assert (enc.spec.feature_dim, len(enc.blocks()), enc.spec.mean, enc.model.patch_embed.patch_size) == (384, 12, IMAGENET_MEAN, (8, 8))
    with torch.no_grad(): assert enc(torch.rand(2, 3, 1, 32, 32) * 255).shape == (2, 384)
    with pytest.raises(MissingWeightsError, match='vit_small_patch8_224.dino/model.safetensors'):
        create_encoder('vit_small_patch8_224.dino', pretrained=True, weights_dir=tmp_path, size=32)


def test_dinov2_feature_is_cls_and_mean_patch():
    "DINOv2's feature is its class token ⊕ the mean of its patch tokens (HF Dinov2ForImageClassification's classifier input)."
    import timm, torch
    from echobook.models.encoders import create_encoder, IMAGENET_MEAN, IMAGENET_STD
    from echobook.tasks.probing import build_probing_model
    torch.manual_seed(0)
    enc = create_encoder('vit_small_patch14_dinov2.lvd142m', size=42).eval()
    ref = timm.create_model('vit_small_patch14_dinov2.lvd142m', pretrained=False, img_size=42).eval()
    ref.load_state_dict(enc.model.state_dict())                 # the same weights in a separate timm model
    x = torch.rand(3, 3, 1, 42, 42) * 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        tokens = ref.forward_features((x[:, :, 0] - mean) / std)   # (3, 1 + 9 patches, 384), after the final norm
        want = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)
        got = enc(x)
    assert tokens.shape == (3, 10, 384) and got.shape == (3, 768) == (3, enc.spec.feature_dim)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got[:, 384:], tokens[:, 0], atol=1e-3)
    with torch.device('meta'):
        base = {p: create_encoder('vit_base_patch14_dinov2.lvd142m', pool=p) for p in ('cls', 'cls_mean')}
        assert {p: e.spec.feature_dim for p, e in base.items()} == dict(cls=768, cls_mean=1536)
        assert build_probing_model(create_encoder('vit_base_patch14_dinov2.lvd142m'), 10).head.in_features == 1536


@pytest.mark.parametrize('table', ['probing_fig1', 'probing_fig2', 'probing_fig3', 'probing_fig4', 'probing_table3'])
def test_resnet_is_trained_supervised(table):
    "In every configuration of paper 002 the ResNet-50 is trained on the views (finetune), the probing figures included."
    from echobook.config import load_table_config
    from echobook.sweeps import expand_grid
    cfg = load_table_config(table)
    for profile in ('paper', 'tiny'):
        confs = [c.params for c in expand_grid(cfg, profile)]
        resnet = [p for p in confs if p['encoder'].startswith('resnet50')]
        assert resnet and all(p['method'] == 'finetune' for p in resnet), (profile, resnet)
        if table in ('probing_fig1', 'probing_fig2'):
            assert all(p['method'] == 'probe' for p in confs if not p['encoder'].startswith('resnet50'))


def test_probe_sequence_curve(tmp_path, views_dir, monkeypatch):
    "Linear probing, sequence-based, parameters given as strings (as `papermill -p` does): the curve rises with data."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rd = _run(tmp_path, views_dir, method='probe', sampling='sequence', seeds='2', n_aug='0', standardize='true')
    assert json.loads((rd/'status.json').read_text())['state'] == 'done'
    cfg = json.loads((rd/'config.json').read_text())
    assert cfg['seeds'] == 2 and cfg['n_aug'] == 0 and cfg['standardize'] is True and cfg['pretrained'] is False
    curve = pd.read_csv(rd/'curve.csv')
    assert sorted(curve.n.unique()) == [1, 2, 4, 8] and set(curve.split) == {'T1', 'T2'} and curve.seed.nunique() == 2
    m = json.loads((rd/'metrics.json').read_text())
    assert {'T1/acc_img', 'T1/acc_seq', 'T2/acc_img', 'T2/bacc_seq'} <= set(m['summary'])
    t1 = curve[curve.split == 'T1'].groupby('n').acc_img.mean()
    print('tiny probe curve, T1 image accuracy by sequences per class:', t1.round(3).to_dict())
    assert t1.iloc[-1] > t1.iloc[0] + .05, t1
    per_seq = pd.read_csv(rd/'per_sequence_T1.csv')
    assert len(per_seq) == 30 and {'sequence', 'view', 'pred_view', 'correct'} <= set(per_seq)
    assert (rd/'figures'/'curve.png').exists() and (rd/'confusion_T2.csv').exists()


def test_finetune_one_size(tmp_path, views_dir, monkeypatch):
    "Full fine-tuning of one image-based size through training.fit, scaled down to 64 samples; checkpointed."
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rd = _run(tmp_path, views_dir, method='finetune', sampling='image', n_train=32, min_samples=64, n_aug=0)
    curve = pd.read_csv(rd/'curve.csv')
    assert curve.n.unique().tolist() == [32] and curve.epochs.iloc[0] == 2 and curve.samples_seen.iloc[0] == 64
    assert len(pd.read_csv(rd/'train_log.csv')) == 2
    fit = rd/'fits'/'n32-s0'
    assert (fit/'checkpoint.pth').exists() and (fit/'best.pth').exists() and len(pd.read_csv(fit/'log.csv')) == 2
    m = json.loads((rd/'metrics.json').read_text())
    assert m['trainable_params'] == m['n_params'] > 0 and m['inference_ms'] > 0


def test_pool_only_for_dinov2(tmp_path):
    "The notebook's `pool` switch is refused, before any work, for an encoder without that choice."
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match='pool: only DINOv2'):
        pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), kernel_name='echobook', cwd=str(tmp_path), progress_bar=False,
                            parameters=dict(encoder='resnet50.a1_in1k', pool='cls', run_dir=str(tmp_path/'run')))
    assert not (tmp_path/'run').exists()


def test_paper_profile_needs_data(tmp_path):
    "The paper profile without data stops before any work, with a message; its encoders default to pretrained weights."
    import papermill as pm
    from echobook.tasks.probing import probing_profile
    assert probing_profile('paper')['pretrained'] is True and probing_profile('tiny')['pretrained'] is False
    with pytest.raises(pm.PapermillExecutionError, match='data_dir'):
        pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), kernel_name='echobook', cwd=str(tmp_path), progress_bar=False,
                            parameters=dict(profile='paper', run_dir=str(tmp_path/'run')))
    assert not (tmp_path/'run').exists()


def test_embeddings_follow_the_data(tmp_path, views_dir):
    "A changed source video is decoded again and gets new embeddings (another cache key), never the stale ones."
    import shutil, torch
    from echobook.models.encoders import create_encoder
    from echobook.tasks.probing import probing_profile, probing_datasets, probe_embeddings
    data = tmp_path/'views'; shutil.copytree(views_dir, data)
    cfg, cache = probing_profile('tiny', prep_size=32, n_aug=0), tmp_path/'cache'
    torch.manual_seed(0); enc = create_encoder('resnet18_2d.in1k', size=32)
    _, tests, _ = probing_datasets(cfg, data, cache, progress=False)
    z0 = probe_embeddings(enc, tests['T2'], cache, progress=False)
    video = Path(sorted((data/'T2').glob('*/*.avi'))[0])
    other = Path(sorted((data/'T1').glob(f'{video.parent.name}/*.avi'))[0])
    shutil.copyfile(other, video)                               # an edited video
    _, tests2, _ = probing_datasets(cfg, data, cache, progress=False)
    z1 = probe_embeddings(enc, tests2['T2'], cache, progress=False)
    assert len(list((cache/'embeddings').glob('*/embeddings.npy'))) == 2
    changed = (tests2['T2'].sequence == f'T2/{video.parent.name}/{video.stem}').to_numpy()
    assert (abs(z1[changed] - z0[changed]).max() > 1e-4) and abs(z1[~changed] - z0[~changed]).max() < 1e-5


@pytest.mark.slow
@pytest.mark.learning   # a tiny-profile result (minutes): `make test-learning`, not `make test`
def test_reproduce_probing_and_finetuning(tmp_path, views_dir, monkeypatch):
    "`echobook reproduce` runs probing and fine-tuning configurations (one encoder each); figures and Table 3 from the folders."
    from echobook.sweeps import run_sweep
    from echobook.tasks.probing_report import curves_figure, plot_tradeoff, table3
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    runs = tmp_path/'runs'
    common = dict(seeds=2, n_aug=0, cache_dir=str(tmp_path/'cache'))
    for table, sets in [('probing_fig2', dict(encoder='vit_small_patch14_dinov2.lvd142m', size=28)),
                        ('probing_table3', dict(encoder='resnet50.a1_in1k', size=32, min_samples=64))]:
        plan = run_sweep(table, 'tiny', data=str(views_dir), overrides={**common, **sets}, runs=runs)
        assert (plan.state == 'done').all(), plan[['id', 'state', 'error']].to_string()
    folders = sorted(p.parent for p in runs.glob('probing_*/*/curve.csv'))
    configs = [json.loads((f/'config.json').read_text()) for f in folders]
    assert {c['method'] for c in configs} == {'probe', 'finetune'}
    curves = pd.concat([pd.read_csv(f/'curve.csv').assign(encoder=c['encoder'], method=c['method']) for f, c in zip(folders, configs)])
    assert len(curves_figure(curves).axes) == 2
    done = [(c, json.loads((f/'metrics.json').read_text())) for f, c in zip(folders, configs) if c['method'] == 'finetune']
    results = pd.DataFrame([dict(encoder=c['encoder'], inference_ms=m['inference_ms'], n_params=m['n_params'], **m['summary']) for c, m in done])
    assert len(plot_tradeoff(results).axes) == 4 and table3(results).shape == (1, 8)
