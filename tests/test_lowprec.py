"""Frozen base in low precision (``sdtune.lowprec``, ``adapters.frozen``): quantised and bf16 bases under fp32 masters.

The end-to-end case: the embedded model's U-Net with LoCon (resnet) and DoRA (attn) over an int8 / nf4 quantised
base trains two steps, exports an A1111 file, and that file applied to the *dequantised* base gives the trained
model's output to fp32 rounding (relative 1e-5), while against the original fp32 base it does not (the
quantisation error, ≥ 1e-3, shows the comparison can fail).
"""
from __future__ import annotations

import pytest
import torch
from helpers_adapters import make_layer, perturb, rel

from sdtune.adapters import AdapterSpec, make_adapter
from sdtune.adapters.frozen import is_quantised, quantise_layer
from sdtune.apply import apply_file
from sdtune.formats.kohya import save_kohya
from sdtune.inject import attach
from sdtune.lowprec import dequantised_state, frozen_bytes, lower_base

KINDS = ["int8", pytest.param("nf4", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"))]
RULES = [("resnet", AdapterSpec("locon", rank=4)), ("attn", AdapterSpec("dora", rank=4))]


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(1, c.in_channels, 16, 16, generator=g)
    text = torch.randn(1, 8, c.cross_attention_dim, generator=g)
    return x, torch.tensor([500]), text


@pytest.mark.parametrize("kind", KINDS)
def test_quantised_base_trains_and_exports_exactly(kind, fresh_tiny_model, tmp_path):
    comps = {"unet": fresh_tiny_model.pipeline.unet}
    unet = comps["unet"]
    inj = attach(comps, RULES, fresh_tiny_model.arch)
    full_bytes = frozen_bytes(comps, inj)
    lower_base(comps, inj, quant=kind)
    assert all(is_quantised(a.base) for a in inj.adapters.values())
    assert frozen_bytes(comps, inj) < 0.6 * full_bytes           # the adapted layers dominate the U-Net
    x, t, text = _inputs(unet)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(inj.parameters(), lr=1e-2)
    start = [p.detach().clone() for p in inj.parameters()]
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(unet(x, t, text).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(start, inj.parameters()))
    assert losses[-1] < losses[0]
    with torch.no_grad():
        y_trained = unet(x, t, text).sample
    deq = dequantised_state(inj)
    save_kohya(inj, tmp_path / "q.safetensors", dtype=torch.float32)
    inj.detach()

    # A fresh fp32 model: the file against the original weights, then against the dequantised ones.
    from sdtune.models import load

    model = load()
    unet32 = model.pipeline.unet
    for exact in (False, True):
        if exact:
            with torch.no_grad():
                for n, layer in _layers(model, deq):
                    layer.weight.copy_(deq[n])
        with apply_file({"unet": unet32}, model.arch, tmp_path / "q.safetensors"), torch.no_grad():
            y = unet32(x, t, text).sample
        err = rel(y, y_trained)
        assert (err < 1e-5) if exact else (err > 1e-3), (exact, err)


def _layers(model, names):
    from sdtune.apply import find_layers

    return find_layers({"unet": model.pipeline.unet}, model.arch, list(names)).items()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algo", ["locon", "dora"])
def test_quantised_layer_equals_its_dequantised_weight(kind, algo):
    """One adapted conv over a quantised base equals the same adapter over nn.Conv2d(dequantised W), forward and
    gradients (fp32), and the quantised base never takes the materialised path in training or merges."""
    layer, x = make_layer("conv3x3")
    spec = AdapterSpec(algo, rank=3)
    q = quantise_layer(layer, kind)
    plain = torch.nn.Conv2d(6, 5, 3, padding=1).requires_grad_(False)
    with torch.no_grad():
        plain.weight.copy_(q.weight)
        plain.bias.copy_(layer.bias)
    aq, ap = make_adapter(q, spec, "lora_q"), make_adapter(plain, spec, "lora_p")
    perturb(aq)
    ap.load_state_dict(aq.state_dict(), strict=False)
    grads = []
    for a in (aq, ap):
        xx = x.clone().requires_grad_(True)
        y = a(xx)
        (y ** 2).sum().backward()
        grads.append((y, xx.grad, torch.cat([p.grad.flatten() for _, p in a.trainable_named_parameters()])))
    for got, want in zip(grads[0], grads[1]):
        assert rel(got, want) < 1e-5
    assert aq.chosen_path(x) == "bypass"
    with pytest.raises(ValueError, match="quantised"):
        aq.merge()


def test_bf16_base_under_autocast_tracks_fp32(fresh_tiny_model):
    """A bf16-stored frozen U-Net under bf16 autocast: factors stay fp32 masters with fp32 gradients, the frozen
    weights take half the bytes, and the loss is within bf16 rounding (2 %) of the fp32 model's."""
    unet = fresh_tiny_model.pipeline.unet
    comps = {"unet": unet}
    inj = attach(comps, RULES, fresh_tiny_model.arch)
    for k, a in enumerate(inj.adapters.values()):
        perturb(a, seed=k, size=0.05, relative=True)
    x, t, text = _inputs(unet)
    target = torch.randn_like(x)
    loss32 = torch.nn.functional.mse_loss(unet(x, t, text).sample, target).item()
    full = frozen_bytes(comps, inj)
    lower_base(comps, inj, dtype="bf16")
    assert frozen_bytes(comps, inj) == pytest.approx(full / 2, rel=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(unet(x, t, text).sample.float(), target)
    loss.backward()
    assert abs(loss.item() - loss32) < 0.02 * loss32
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in inj.parameters())


def test_lower_base_rejects_bad_input(fresh_tiny_model):
    comps = {"unet": fresh_tiny_model.pipeline.unet}
    inj = attach(comps, [("resnet", AdapterSpec("locon", rank=2, path="materialise"))], fresh_tiny_model.arch)
    with pytest.raises(ValueError, match="base quantisation 'int4'"):
        lower_base(comps, inj, quant="int4")
    with pytest.raises(ValueError, match="base dtype"):
        lower_base(comps, inj, dtype="fp8")
    with pytest.raises(ValueError, match="materialise"):
        lower_base(comps, inj, quant="int8")


def test_config_keys_checked():
    from sdtune.config import ConfigError, TrainSection

    assert TrainSection(steps=1, base_quant="int8", base_dtype="bf16", mixed_precision="bf16").base_quant == "int8"
    with pytest.raises(ConfigError, match="needs mixed_precision = 'bf16'"):
        TrainSection(steps=1, base_dtype="bf16")
    with pytest.raises(ConfigError, match="base_quant"):
        TrainSection(steps=1, base_quant="int4")


def test_trainer_with_quantised_base(tmp_path):
    """`sdtune train` with train.base_quant = "int8": the adapted layers are quantised, it trains and exports."""
    from sdtune.config import loads_config
    from sdtune.toy import world as tw
    from sdtune.train.loop import Trainer

    tw.write_instance_folder("sks", tmp_path / "inst", n=2)
    cfg = loads_config(f"""
[data]
instance_dir = "{tmp_path / 'inst'}"
[[adapters]]
preset = "attn"
algorithm = "dora"
rank = 2
[[adapters]]
preset = "resnet"
rank = 2
[train]
steps = 2
base_quant = "int8"
[output]
dir = "{tmp_path / 'run'}"
validation_prompts = []
""")
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    assert all(is_quantised(a.base) for a in trainer.injection.adapters.values())
    result = trainer.run()
    assert result.status == "finished" and result.step == 2     # DoRA's export check passes after 2 small steps
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
