"""Small real-layout models and hand-made adapter files for tests/test_formats.py."""
from __future__ import annotations

import torch
from torch import nn

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=1000, hidden_act="quick_gelu", projection_dim=32)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval().requires_grad_(False)


def tiny_components(seed: int = 0) -> dict[str, nn.Module]:
    return {"unet": tiny_unet(seed), "text_encoder": tiny_text_encoder(seed)}


def layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def rand(*shape, seed=None):
    return torch.randn(*shape) if seed is None else torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
