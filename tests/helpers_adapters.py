"""Shared builders for the adapter/injection tests: small layers, the case table, dense fp64 references, and
perturbed adapters (``perturb``, ``perturb_all``, ``write_adapter``)."""
from __future__ import annotations

import dataclasses
import zlib

import torch
from torch import nn

from sdtune.adapters import AdapterSpec

# (id, layer factory, input shape) — small enough that every case runs in milliseconds.
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (2, 3, 12)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 7, 7)),
    "conv3x3": (lambda: nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7)),
    "conv3x3_s2": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 8, 8)),
    "conv3x3_p0": (lambda: nn.Conv2d(6, 5, 3, padding=0, bias=False), (2, 6, 7, 7)),
    "conv3x3_d2": (lambda: nn.Conv2d(6, 5, 3, padding=2, dilation=2), (2, 6, 9, 9)),
}

SPECS = {
    "locon": AdapterSpec("locon", rank=3, alpha=2.0),
    "locon_tucker": AdapterSpec("locon", rank=3, tucker=True),
    "locon_rslora": AdapterSpec("locon", rank=3, alpha=4.0, rslora=True),
    "flora": AdapterSpec("flora", rank=3, scale=1.5),
    "dora_locon_in": AdapterSpec("dora", rank=3),
    "dora_locon_out": AdapterSpec("dora", rank=3, dora_axis="out"),
    "dora_flora_in": AdapterSpec("dora", rank=2, dora_base="flora"),
    "dora_flora_out": AdapterSpec("dora", rank=2, dora_base="flora", dora_axis="out"),
    "spectral_add": AdapterSpec("spectral", rank=2),
    "spectral_rot": AdapterSpec("spectral", rank=3, spectral_mode="rotational"),
    "spectral_add_slot1": AdapterSpec("spectral", rank=2, slot=1),
    "locon_ortho": AdapterSpec("locon", rank=2, alpha=3.0, ortho_basis_seed=7, ortho_index=1),
}

CASES = [(a, l) for a in SPECS for l in LAYERS]
CASE_IDS = [f"{a}-{l}" for a, l in CASES]


def with_path(spec: AdapterSpec, path: str) -> AdapterSpec:
    return dataclasses.replace(spec, path=path)


def make_layer(layer_id: str, dtype=torch.float32, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    factory, shape = LAYERS[layer_id]
    layer = factory().to(dtype).requires_grad_(False)
    return layer, torch.randn(shape, dtype=dtype)


@torch.no_grad()
def perturb(adapter, seed: int = 1, size: float = 0.3, *, relative: bool = False) -> None:
    """Move every trainable tensor off its init, so that ΔW ≠ 0 and every factor matters: by ``size`` × N(0, 1), or
    with ``relative`` by ``size`` × N(0, 1) × the tensor's mean magnitude (0.5 for a zero-init one; what keeps
    real-size layers well-conditioned)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in adapter.trainable_named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if p.dim() == 1 and p.numel() and (p > 0).all():        # DoRA magnitude: keep positive
            p.mul_(1 + 0.2 * noise.tanh())
        else:
            p.add_(size * noise * (p.abs().mean() if p.abs().sum() > 0 else 0.5) if relative else size * noise)


def write_adapter(comps, path, rules, seed, *, svd_cache=None, metadata=None, size=0.3, arch="sd1"):
    """Attach, perturb (so ΔW ≠ 0), export a kohya file in float32, detach: the model is unchanged afterwards.
    Returns {kohya name: ΔW (float64)}."""
    from sdtune.formats.kohya import save_kohya
    from sdtune.inject import attach

    inj = attach(comps, rules, arch, svd_cache_dir=svd_cache)
    try:
        for k, a in enumerate(inj.adapters.values()):
            perturb(a, seed=1000 * seed + k, size=size)
        deltas = {n: a.delta_weight().detach().double() for n, a in inj.adapters.items()}
        save_kohya(inj, path, dtype=torch.float32, metadata=metadata)
    finally:
        inj.detach()
    return deltas


def perturb_all(inj) -> None:
    """``perturb`` every adapter of an Injection by 10 % of its tensors' size, seeded by its kohya name."""
    for name, adapter in inj.adapters.items():
        perturb(adapter, seed=zlib.crc32(name.encode()), size=0.1, relative=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def closed_form_params(spec: AdapterSpec, layer: nn.Module) -> int:
    """Trainable parameter counts from the papers' formulas, written independently of sdtune."""
    w = layer.weight
    out, inp = w.shape[:2]
    kh, kw = (w.shape[2], w.shape[3]) if w.dim() == 4 else (1, 1)
    kind = spec.dora_base if spec.algorithm == "dora" else spec.algorithm
    r = spec.rank
    if kind == "locon" and spec.ortho_basis_seed is not None:
        n = r * out                                    # down is a frozen orthogonal buffer
    elif kind == "locon":
        n = r * (out + inp) + r * r * kh * kw if (spec.tucker and kh * kw > 1) else r * (out + inp * kh * kw)
    elif kind == "flora":
        if w.dim() == 4:
            r1, r2, r3, r4 = spec.flora_ranks or (r, r, min(kh, 2), min(kw, 2))
            n = r1 * r2 * r3 * r4 + out * r1 + inp * r2 + kh * r3 + kw * r4
        else:
            r1, r2 = spec.flora_ranks or (r, r)
            n = r1 * r2 + out * r1 + inp * r2
    elif spec.spectral_mode == "rotational":
        n = r * (r - 1)
    else:
        n = r * (out + inp * kh * kw)
    if spec.algorithm == "dora":
        n += inp if spec.dora_axis == "in" else out
    return n


def dense_reference(adapter) -> torch.Tensor:
    """ΔW in float64 from the adapter's native factors by explicit sums of outer products (no sdtune maths)."""
    spec, lora = adapter.spec, adapter.lora
    W = adapter.base.weight.detach().double()
    P = {n.split(".")[-1]: p.detach().double() for n, p in adapter.trainable_named_parameters()}
    if spec.ortho_basis_seed is not None:                 # frozen buffer, not a parameter
        P["down"] = lora.down.detach().double()
    kind = spec.dora_base if spec.algorithm == "dora" else spec.algorithm
    if kind == "locon":
        up, down, s = P["up"], P["down"], lora.scale
        d = torch.zeros_like(W)
        if "mid" in P:
            for a in range(up.shape[1]):
                for b in range(down.shape[0]):
                    d += s * up[:, a, None, None, None] * P["mid"][a, b][None, None] * down[b][None, :, None, None]
        else:
            for a in range(up.shape[1]):
                d += s * up[:, a].reshape(-1, *[1] * (W.dim() - 1)) * down[a][None]
    elif kind == "flora":
        G, s = P["core"], lora.scale
        mats = [P["a_out"], P["a_in"]] + ([P["a_kh"], P["a_kw"]] if W.dim() == 4 else [])
        d = torch.zeros_like(W)
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in G.shape]).reshape(-1, G.dim()).tolist():
            term = G[tuple(idx)] * mats[0][:, idx[0]]
            for m, i in zip(mats[1:], idx[1:]):
                term = term[..., None] * m[:, i]
            d += s * term
    else:
        u1, s1, v1 = (getattr(lora, n).double() for n in ("u1", "s1", "v1"))
        S = torch.diag(s1)
        if spec.spectral_mode == "rotational":
            r = spec.rank
            rots = []
            for q in (P["q_u"], P["q_v"]):
                Q = torch.zeros(r, r, dtype=torch.float64)
                iu = torch.triu_indices(r, r, 1)
                Q[iu[0], iu[1]] = q
                Q = Q - Q.T
                I = torch.eye(r, dtype=torch.float64)
                rots.append((I - Q) @ torch.linalg.inv(I + Q))
            d = u1 @ rots[0] @ S @ rots[1].T @ v1.T - u1 @ S @ v1.T
        else:
            d = (u1 + P["a_u"]) @ S @ (v1 + P["a_v"]).T - u1 @ S @ v1.T
        d = d.reshape(W.shape)
    if spec.algorithm != "dora":
        return d
    m = P["magnitude"]
    V = W + d
    if spec.dora_axis == "out":
        norm = torch.stack([V[o].norm() for o in range(V.shape[0])])
        Wp = V * (m / norm).reshape(-1, *[1] * (W.dim() - 1))
    else:
        norm = torch.stack([V[:, i].norm() for i in range(V.shape[1])])
        Wp = V * (m / norm).reshape(1, -1, *[1] * (W.dim() - 2))
    return Wp - W


def kohya_rebuild(t: dict, W: torch.Tensor) -> torch.Tensor:
    """ΔW as A1111 / ComfyUI rebuild it: alpha / lora_down.shape[0] · up @ [mid] @ down (+ A1111's DoRA)."""
    if "diff" in t:
        return t["diff"].double()
    up, down = t["lora_up.weight"].double(), t["lora_down.weight"].double()
    scale = t["alpha"].double().item() / down.shape[0]
    if "lora_mid.weight" in t:
        d = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), t["lora_mid.weight"].double(), down.flatten(1))
    else:
        d = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    d = scale * d.reshape(W.shape)
    if "dora_scale" in t:                      # A1111 network.py apply_weight_decompose, input-channel norm
        merged = W.double() + d
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(merged.shape[1], *[1] * (W.dim() - 1)).transpose(0, 1)
        d = merged * (t["dora_scale"].double() / norm) - W.double()
    return d


def tiny_outputs(components: dict[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (1, 6), generator=g)
    hidden = components["text_encoder"](ids).last_hidden_state
    x = torch.randn(1, 4, 8, 8, generator=g)
    return components["unet"](x, torch.tensor([10]), hidden).sample, hidden
