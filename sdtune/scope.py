"""Per-block rules: which U-Net blocks and text-encoder layers an ``[[adapters]]`` rule covers.

A rule's ``blocks`` names U-Net blocks by their diffusers module paths, the names ``sdtune.blocks`` uses:
``down_blocks.N``, ``mid_block``, ``up_blocks.N`` and ``other`` (conv_in, time embedding, conv_out: outside the
three block stacks). A ``te`` rule's ``layers = [first, last]`` covers text-encoder layers first…last (inclusive;
every text encoder of the model). Inside ``inject`` the scope travels with the preset as one string, the scoped
preset ``attn@down_blocks.1,mid_block`` or ``te@layers.0-5``, so the native file's ``sdtune_rules`` replays it.
"""
from __future__ import annotations

import re

_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+|other)$")
_LAYERS = re.compile(r"^layers\.(\d+)-(\d+)$")
_TE_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def unet_block(path: str) -> str:
    """The block of a U-Net module path: ``down_blocks.1``, ``mid_block``, ``up_blocks.0`` or ``other``."""
    head = path.split(".")
    if head[0] in ("down_blocks", "up_blocks") and len(head) > 1:
        return ".".join(head[:2])
    return "mid_block" if head[0] == "mid_block" else "other"


def te_layer(path: str) -> int | None:
    m = _TE_LAYER.search(path)
    return int(m.group(1)) if m else None


def check(preset: str, blocks: list[str], layers: list[int] | None) -> str | None:
    """Why ``blocks``/``layers`` do not fit ``preset``, or None."""
    bad = [b for b in blocks if not _BLOCK.match(b)]
    if bad:
        return f"blocks {bad}: expected down_blocks.N, mid_block, up_blocks.N or other"
    if blocks and preset == "te":
        return "blocks are U-Net blocks; a 'te' rule takes layers = [first, last]"
    if layers is not None:
        if preset != "te":
            return "layers = [first, last] selects text-encoder layers: only for preset 'te' (U-Net: blocks)"
        if len(layers) != 2 or not 0 <= layers[0] <= layers[1]:
            return f"layers = {layers}: expected [first, last] with 0 <= first <= last"
    return None


def scoped(preset: str, blocks: list[str], layers: list[int] | None) -> str:
    """The scoped preset string for ``inject`` (the plain preset when the rule covers everything)."""
    scope = list(blocks) + ([f"layers.{layers[0]}-{layers[1]}"] if layers is not None else [])
    return f"{preset}@{','.join(scope)}" if scope else preset


def split(scoped_preset: str) -> tuple[str, list[str]]:
    """``"attn@down_blocks.0,mid_block"`` -> ("attn", ["down_blocks.0", "mid_block"])."""
    preset, _, scope = scoped_preset.partition("@")
    items = [s for s in scope.split(",") if s]
    bad = [s for s in items if not (_BLOCK.match(s) or _LAYERS.match(s))]
    if bad:
        raise ValueError(f"preset {scoped_preset!r}: unknown scope {bad}; expected down_blocks.N, mid_block, "
                         f"up_blocks.N, other or layers.A-B")
    return preset, items


def covers(items: list[str], component: str, path: str) -> bool:
    """Is the module ``component``.``path`` inside the scope ``items`` (empty: everything)?"""
    if not items:
        return True
    if component == "unet":
        return unet_block(path) in items
    layer = te_layer(path)
    for item in items:
        m = _LAYERS.match(item)
        if m and layer is not None and int(m.group(1)) <= layer <= int(m.group(2)):
            return True
    return False
