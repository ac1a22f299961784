"""Published architecture configs (SD1.5, SD2.1, SDXL) and random-weight builders.

No weights are downloaded: the configs below are the ones the original checkpoints ship with, so a model
built here has the real module tree, names and parameter counts (SD1.5 U-Net: 859,520,964 parameters;
SDXL U-Net: 2,567,463,684). Used for export-format checks and speed benchmarks. Build on
``device="meta"`` to get the module tree without allocating memory. ``small=True`` keeps each architecture's
block structure (block types, layers per block, transformer depths, SDXL's text-time conditioning, the text-encoder
classes) and shrinks only the widths (and the text encoders' depth): the same U-Net module names and
LDM layout with real tensors that run in milliseconds, for loader cross-checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ARCHS = ("sd1", "sd2", "sdxl")

UNET_CONFIGS: dict[str, dict] = {
    "sd1": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sd2": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}

_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512)
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)

# Overrides for ``small=True``: widths only (attention heads chosen to divide them; SDXL's cross-attention width is
# the two text encoders' widths concatenated and its add-embedding input the pooled projection + 6 time ids).
_SMALL_UNET: dict[str, dict] = {
    "sd1": dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=32),
    "sd2": dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 2, 4, 4), cross_attention_dim=32),
    "sdxl": dict(block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4), cross_attention_dim=32 + 48,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8),
}
_SMALL_TE: dict[str, dict] = {
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
    "text_encoder_2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=40),
}

# (component name, config, has projection head) per architecture, in pipeline order.
TEXT_ENCODER_CONFIGS: dict[str, list[tuple[str, dict, bool]]] = {
    "sd1": [("text_encoder", _CLIP_L, False)],
    "sd2": [("text_encoder", _OPENCLIP_H, False)],
    "sdxl": [("text_encoder", _CLIP_L, False), ("text_encoder_2", _OPENCLIP_BIGG, True)],
}


def detect_arch(unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]) -> str:
    """SD1.x, SD2.x or SDXL from the U-Net and text-encoder configs (not from file names)."""
    cfg = unet.config
    if "text_encoder_2" in text_encoders or getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    te = text_encoders.get("text_encoder")
    hidden_act = getattr(getattr(te, "config", None), "hidden_act", "quick_gelu")
    if cfg.cross_attention_dim == 1024 or hidden_act == "gelu":
        return "sd2"
    return "sd1"


@dataclass
class RandomModel:
    """A real-architecture U-Net plus text encoder(s) with random weights."""

    arch: str
    unet: UNet2DConditionModel
    text_encoders: dict[str, torch.nn.Module]

    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, **self.text_encoders}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def unet_config(arch: str, *, small: bool = False) -> dict:
    """The U-Net config of ``arch`` (published, or with ``small`` widths; see the module docstring)."""
    _check_arch(arch)
    return {**UNET_CONFIGS[arch], **(_SMALL_UNET[arch] if small else {})}


def text_encoder_configs(arch: str, *, small: bool = False) -> list[tuple[str, dict, bool]]:
    """(component name, CLIPTextConfig kwargs, has projection head) of ``arch``'s text encoders."""
    _check_arch(arch)
    return [(name, {**cfg, **(_SMALL_TE[name] if small else {})}, proj)
            for name, cfg, proj in TEXT_ENCODER_CONFIGS[arch]]


def build_unet(arch: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, small: bool = False) -> UNet2DConditionModel:
    config = unet_config(arch, small=small)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    return unet.eval().requires_grad_(False)


def build_text_encoders(arch: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        seed: int = 0, small: bool = False) -> dict[str, torch.nn.Module]:
    configs = text_encoder_configs(arch, small=small)
    torch.manual_seed(seed)
    out: dict[str, torch.nn.Module] = {}
    for name, cfg, with_projection in configs:
        config = CLIPTextConfig(**cfg)
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        with torch.device(device):
            model = cls(config)
        out[name] = model.to(dtype=dtype).eval().requires_grad_(False)
    return out


def build_random(arch: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, text_encoders: bool = True, small: bool = False) -> RandomModel:
    """Build the U-Net (and text encoders) of ``arch`` with random weights; ``device="meta"`` allocates nothing;
    ``small`` gives the same block structure with small widths."""
    unet = build_unet(arch, device=device, dtype=dtype, seed=seed, small=small)
    tes = build_text_encoders(arch, device=device, dtype=dtype, seed=seed, small=small) if text_encoders else {}
    return RandomModel(arch, unet, tes)
