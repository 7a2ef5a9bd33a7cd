"""Shared pytest fixtures: a small phantom dataset built once per session."""
import os
os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
import pytest


def pytest_configure(config):
    config.addinivalue_line('markers', 'notebook: executes an nbs/ notebook top to bottom')
    config.addinivalue_line('markers', 'slow: takes more than ~30 s on 2 CPU cores')
    config.addinivalue_line('markers', 'learning: checks a tiny-profile result (a model learns); minutes; run by `make test-learning`')
    config.addinivalue_line('markers', 'heavy: re-executes whole tutorials or paper-shape runs (many minutes); run by `make test-heavy`, not `make test`')


@pytest.fixture(scope='session')
def phantom_dir(tmp_path_factory):
    "A 24-video phantom dataset in EchoNet-Dynamic layout (built once per test session)."
    from echobook.data.phantom import make_phantom
    return make_phantom(tmp_path_factory.mktemp('phantom'), n_videos=24, seed=0, progress=False)
