"""Shared fixtures: the embedded demo pipelines (built once per session, no model hub), quiet progress bars,
and hooks that never leak from one test into the next."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("DIFFUSERS_QUANT_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_configure(config):
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    # A per-session cache unless the caller points at a shared one (CI may reuse it between runs).
    if "DIFFUSERS_QUANT_CACHE" not in os.environ:
        os.environ["DIFFUSERS_QUANT_CACHE"] = str(tmp_path_factory.mktemp("demo-cache"))
    return os.environ["DIFFUSERS_QUANT_CACHE"]


@pytest.fixture(scope="session")
def flux_path(demo_cache):
    from diffusers_quant.demo import demo_path

    return demo_path("flux")


@pytest.fixture(scope="session")
def sd_path(demo_cache):
    from diffusers_quant.demo import demo_path

    return demo_path("sd")


@pytest.fixture(autouse=True)
def no_leaked_hooks(monkeypatch):
    monkeypatch.delenv("DIFFUSERS_QUANT", raising=False)
    yield
    import diffusers_quant

    diffusers_quant.uninstall()


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A folder with the config of the 3072-wide one-block Flux of ``flux_original``."""
    from flux_original import write_config

    folder = tmp_path_factory.mktemp("flux3072")
    write_config(folder)
    return folder
