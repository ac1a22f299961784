"""Shared fixtures. The embedded model is loaded once per session (it is small and read-only in tests)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model():
    """The embedded base model (never mutate it in a test: use ``fresh_tiny_model``)."""
    from sdtune.models import load

    return load()


@pytest.fixture
def fresh_tiny_model():
    """A private copy of the embedded base model that a test may modify."""
    from sdtune.models import load

    return load()


@pytest.fixture(scope="session")
def judge_model():
    from sdtune.toy import judge

    return judge.load()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A small SDXL-layout model (random weights; ``helpers_formats.tiny_sdxl_folder``), loaded from its diffusers
    folder the way a user's SDXL model is; read-only like ``tiny_model``."""
    from helpers_formats import tiny_sdxl_folder

    from sdtune.models import load

    folder = tmp_path_factory.mktemp("tiny-sdxl") / "model"
    tiny_sdxl_folder(folder)
    return load(folder)
