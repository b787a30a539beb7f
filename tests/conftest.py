"""Shared fixtures: a small demo dataset, the real COCO sample, an isolated cache folder."""

import os
from pathlib import Path

import pytest

from bench import real_data
from tests.helpers import COCO_SAMPLE


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Token and feature caches go to a temporary folder, never the user's."""
    os.environ["CAPTIONING_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return Path(os.environ["CAPTIONING_CACHE"])


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small built-in demo dataset (the generator's real output, fewer images)."""
    from captioning.demo.dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "demo"
    return make_demo_dataset(root, n_train=60, n_val=20, n_test=20, seed=1, progress=False)


@pytest.fixture(scope="session")
def coco_sample():
    """The real COCO 2017 sample ($CAPTIONING_TEST_DATA; skipped when absent)."""
    if not (COCO_SAMPLE / "annotations" / "captions_train2017.json").exists():
        pytest.skip(real_data.missing(COCO_SAMPLE))
    return COCO_SAMPLE


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests (those that ask for it), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
