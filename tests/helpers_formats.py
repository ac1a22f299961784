"""Small real-layout models and the LyCORIS merge oracle for tests/test_formats.py and
tests/test_loaders.py."""
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


def lycoris_merge(path, modules: dict[str, nn.Module]) -> tuple[set[str], set[str]]:
    """Merge the file at ``path`` into the live layers ``modules`` (kohya name -> layer) the way LyCORIS 4.1.3's
    kohya loader does (``get_module`` detects the algorithm from the keys, ``make_module``, ``merge_to(1.0)``);
    returns (keys consumed, keys in the file). The name -> layer map is the caller's: LyCORIS's
    ``create_network_from_weights`` looks names up as ``lora_unet_`` + module path of the U-Net it is given,
    which for SDXL is kohya's own LDM-layout U-Net, and it first builds a default network that asserts on
    diffusers' duplicate module names, so its inner loop is run here.

    LyCORIS's loader assumes output-axis DoRA and raises on an input-axis ``dora_scale`` (LOADER-FACTS), so those
    modules are built with its LoConModule(wd_on_out=False) from the same tensors."""
    import safetensors.torch
    from lycoris.modules import LoConModule, get_module, make_module

    sd = safetensors.torch.load_file(str(path))
    used = set()
    for name in sorted({k.split(".")[0] for k in sd}):
        if name not in modules:
            continue
        g = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == name}
        if "dora_scale" in g and g["dora_scale"].shape[0] == 1:
            mid = g.get("lora_mid.weight")
            module = LoConModule(name, modules[name], 1.0, g["lora_down.weight"].shape[0], float(g["alpha"]),
                                 use_tucker=mid is not None, weight_decompose=True, wd_on_out=False)
            with torch.no_grad():
                module.lora_down.weight.copy_(g["lora_down.weight"])
                module.lora_up.weight.copy_(g["lora_up.weight"])
                if mid is not None:
                    module.lora_mid.weight.copy_(mid)
                module.dora_scale.copy_(g["dora_scale"])
            keys = set(g)
        else:
            cls, params = get_module(sd, name)
            module = make_module(cls, params, name, modules[name])
            keys = {k for k in cls.weight_list if k in g}
        module.merge_to(1.0)
        used |= {f"{name}.{k}" for k in keys}
    return used, set(sd)
