"""A quiet, honest console: sdtune's own lines and progress bars, not third-party advice the user cannot act on.

``quiet_third_party()`` is called once by the CLI before diffusers or transformers are imported. It drops exactly
the messages in ``NOISE`` (advice to install packages sdtune does not need, deprecations addressed to another library's
developers) and hides the libraries' own loading bars; every other warning stays visible.
"""
from __future__ import annotations

import logging
import os

# (logger name, text that marks a message as noise). Logger filters apply to the records that logger creates.
NOISE = (
    ("transformers.utils.import_utils", "requires torchvision"),  # advice to install what sdtune does not use
    ("torch.utils._pytree", "register_constant() on Enum subclasses is deprecated"),  # torchao's import, for its devs
)


class _DropNoise(logging.Filter):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in str(record.msg)


def quiet_third_party() -> None:
    """Drop known noise and the libraries' weight-loading bars (idempotent)."""
    for name, marker in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.marker == marker for f in logger.filters):
            logger.addFilter(_DropNoise(marker))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "warning")


def hide_pipeline_loading_bar() -> None:
    """diffusers' "Loading pipeline components" bar has no environment switch; turn it off once diffusers is loaded."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
