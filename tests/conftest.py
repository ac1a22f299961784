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
def tiny_sdxl():
    """The embedded SDXL-family base (``assets/tiny-sdxl``: SDXL's module tree at toy widths, pretrained on the toy
    world), loaded from its diffusers folder the way a user's SDXL model is; read-only like ``tiny_model``."""
    from sdtune.models import load
    from sdtune.resources import ASSETS

    return load(ASSETS / "tiny-sdxl")
