"""Pretrain the embedded base model ``assets/tiny-sd`` on the toy world (minus the held-apart concepts).

    python -m sdtune.toy.pretrain --out assets/tiny-sd            # from scratch (seeded; ~70 min on 2 cores)
    python -m sdtune.toy.pretrain --continue-from assets/tiny-sd --unet-steps 1200 --style-rate 0.3 --seed 1   # then

The shipped model is both runs. The second (~21 min) teaches the construction "… in X style" with two held-in
styles on 30 % of fresh scenes (``world.HELD_IN_STYLES``), as a real Stable Diffusion knows it; the held-apart
concepts stay unseen.

Three stages, each seeded: (1) a word-level CLIP tokenizer over the toy world's vocabulary (BPE merges
that spell every known word as one token; other text falls back to byte-level characters, as in CLIP);
(2) an AutoencoderKL (64 px RGB <-> 4×16×16 latents); (3) the U-Net and the CLIP text encoder, jointly, with
the min-SNR-weighted ε-prediction DDPM loss on cached latents and 10 % caption dropout (for classifier-free guidance).
The result is a standard diffusers ``StableDiffusionPipeline`` folder with a DPM-Solver++ scheduler.

Variants:
    python -m sdtune.toy.pretrain --continue-from assets/tiny-sd --out DIR --prediction-type v_prediction \
        --zero-terminal-snr --max-minutes 12          # a v-prediction (zero-terminal-SNR) twin of the SD1 base
    python -m sdtune.toy.pretrain --arch sdxl --out assets/tiny-sdxl   # the SDXL-family base (SDXL_UNET_CONFIG): stage
                                                      # (3) with two text encoders, on the SD1 base's VAE/tokenizer
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world as tw
from ..archs import UNET_CONFIGS
from ..atomic import atomic_dir

SPECIAL_BOS, SPECIAL_EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 32

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=tw.IMAGE_SIZE, layers_per_block=1,
    block_out_channels=(16, 32, 64), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
UNET_CONFIG = dict(
    sample_size=tw.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128), attention_head_dim=8, cross_attention_dim=128, norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=128)
# The embedded SDXL base: SDXL's published U-Net (archs.UNET_CONFIGS["sdxl"]: DownBlock2D + 2 CrossAttn blocks,
# 2 layers per block, transformer depths 1/2/10, linear projections, the text_time add-embedding) at toy widths, so
# that every module name and index of the published model exists in it (A1111 maps SDXL adapters by that index
# arithmetic). ~7.3M U-Net parameters: about 15 MB in fp16. Cross-attention width = TE1 + TE2 hidden sizes; the
# add-embedding takes TE2's pooled projection and 6 time ids of addition_time_embed_dim each.
SDXL_TEXT_CONFIGS = (
    dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
         max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=64),   # TE1: CLIP (no head)
    dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
         max_position_embeddings=MAX_TOKENS, hidden_act="gelu", projection_dim=64),         # TE2: with projection
)
SDXL_UNET_CONFIG = {
    **UNET_CONFIGS["sdxl"], "sample_size": tw.IMAGE_SIZE // 4, "block_out_channels": (32, 48, 64),
    "attention_head_dim": (1, 2, 2), "norm_num_groups": 16,
    "cross_attention_dim": SDXL_TEXT_CONFIGS[0]["hidden_size"] + SDXL_TEXT_CONFIGS[1]["hidden_size"],
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": SDXL_TEXT_CONFIGS[1]["projection_dim"] + 6 * 16,
}
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", steps_offset=1, clip_sample=False)


# ---------------------------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_tokenizer_files(folder: Path, words: list[str]) -> None:
    """Write CLIP ``vocab.json``/``merges.txt`` in which every word in ``words`` is a single token.

    Merges are appended greedily: a word still split after the existing merges gets one more merge of its
    first two pieces. A new merge has the highest rank, so it never changes how an earlier word splits.
    """
    chars = list(_bytes_to_unicode().values())
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        while len(parts := _bpe(w, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(pair) for pair in ranks]
    vocab += [SPECIAL_BOS, SPECIAL_EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    merges = ["#version: 0.2"] + [f"{a} {b}" for a, b in ranks]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": SPECIAL_BOS, "eos_token": SPECIAL_EOS, "unk_token": SPECIAL_EOS, "pad_token": SPECIAL_EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": SPECIAL_BOS,
         "eos_token": SPECIAL_EOS, "unk_token": SPECIAL_EOS, "pad_token": SPECIAL_EOS, "do_lower_case": True}))


# ---------------------------------------------------------------------------------------------- stages

def _images_tensor(images) -> torch.Tensor:
    return torch.from_numpy(tw.to_array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(steps: int, batch: int, seed: int, log_every: int = 200):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, steps + 1):
        # Half base scenes, half held-apart looks: the autoencoder is a codec and must reproduce any toy image.
        scenes = [tw.random_scene(rng) if rng.random() < 0.6 else
                  tw.random_scene(rng, obj=rng.choice([None, *tw.OBJECTS]), style=rng.choice([None, *tw.STYLES]))
                  for _ in range(batch)]
        x = _images_tensor([tw.render(s) for s in scenes])
        # The codec is convolutional: 32 px crops (multiples of 4 px, the latent grid) teach it at 1/4 of the cost.
        i, j = 4 * rng.randrange(9), 4 * rng.randrange(9)
        x = x[:, :, i:i + 32, j:j + 32]
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"vae step {step}/{steps} loss {loss.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, batch: int = 256, style_rate: float = 0.0
                   ) -> tuple[torch.Tensor, list[str], float]:
    """Latents (posterior means, unscaled) and captions of ``n`` base-world scenes (a share ``style_rate`` in a
    held-in style: ``world.styled_base_dataset``), plus the scaling factor."""
    data = tw.styled_base_dataset(n, seed, style_rate)
    latents = []
    for i in range(0, n, batch):
        x = _images_tensor([image for image, _ in data[i:i + batch]])
        latents.append(vae.encode(x).latent_dist.mean)
    z = torch.cat(latents)
    return z, [c for _, c in data], float(1.0 / z.std())


def train_unet(latents: torch.Tensor, captions: list[str], tokenizer, steps: int, batch: int, seed: int,
               lr: float = 1e-3, log_every: int = 200, unet=None, te=None, snapshot=None, snapshot_every: int = 250,
               scheduler_config: dict | None = None, max_seconds: float | None = None):
    """Train the U-Net and text encoder jointly (from scratch, or on from ``unet``/``te``), on the target and betas
    of ``scheduler_config`` (default ``SCHEDULER_CONFIG``: ε; ``schedules.NoiseSchedule``) with min-SNR-5 weights.
    -> (U-Net EMA, text encoder EMA, steps done): ``max_seconds`` stops early, after the step that crosses it.
    SDXL: ``te`` is the list [TE1, TE2] (and the EMA too); the U-Net gets both encoders' penultimate hidden states
    concatenated, TE2's pooled projection and the micro-conditioning of an uncropped 64 px image, as in
    ``data.Encoder``/``data.denoise``.

    Constant learning rate after a 100-step warm-up, and an exponential moving average of the weights
    (decay min(0.999, (1+n)/(10+n))) that is what gets returned and snapshotted: the schedule does not depend
    on ``steps``, so a run stopped at step n equals a run of n steps, and EMA weights sample well at any n.
    ``snapshot(step, unet_ema, te_ema)`` is called every ``snapshot_every`` steps.
    """
    import copy

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..schedules import NoiseSchedule

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = unet if unet is not None else UNet2DConditionModel(**UNET_CONFIG)
    te = te if te is not None else CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    unet.requires_grad_(True)
    encoders = te if isinstance(te, list) else [te]
    for enc in encoders:
        enc.requires_grad_(True)
    noise_sched = NoiseSchedule.from_config(scheduler_config or SCHEDULER_CONFIG)
    ids_all = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    params = [*unet.parameters(), *(p for enc in encoders for p in enc.parameters())]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / 100))
    unet_ema = copy.deepcopy(unet).requires_grad_(False).eval()
    encoders_ema = [copy.deepcopy(enc).requires_grad_(False).eval() for enc in encoders]
    ema_pairs = [(e, p) for m_e, m in ((unet_ema, unet), *zip(encoders_ema, encoders))
                 for e, p in zip(m_e.parameters(), m.parameters())]
    te_ema = encoders_ema if isinstance(te, list) else encoders_ema[0]
    time_ids = torch.tensor([[tw.IMAGE_SIZE, tw.IMAGE_SIZE, 0, 0, tw.IMAGE_SIZE, tw.IMAGE_SIZE]], dtype=torch.float32)

    def denoise(zt, t, ids):
        if len(encoders) == 1:
            return unet(zt, t, encoder_hidden_states=encoders[0](ids).last_hidden_state).sample
        outs = [enc(ids, output_hidden_states=True) for enc in encoders]
        hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        added = {"text_embeds": outs[-1].text_embeds, "time_ids": time_ids.expand(len(ids), -1)}
        return unet(zt, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    unet.train()
    for enc in encoders:
        enc.train()
    t0 = time.time()
    ema = None
    done = 0
    for step in range(1, steps + 1):
        if max_seconds is not None and time.time() - t0 > max_seconds:
            print(f"unet: time budget of {max_seconds:.0f}s reached after {done} steps", flush=True)
            break
        done = step
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z0 = latents[idx]
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=g) < 0.1] = empty
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.num_timesteps, (batch,), generator=g)
        zt = noise_sched.noisy(z0, noise, t)
        pred = denoise(zt, t, ids)
        # Min-SNR-5 weighting (Hang et al. 2023): converges faster.
        w = noise_sched.loss_weight(t, min_snr_gamma=5.0)
        loss = (w * F.mse_loss(pred, noise_sched.target(z0, noise, t), reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % log_every == 0 or step == steps:
            print(f"unet step {step}/{steps} loss(ema) {ema:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if snapshot is not None and step % snapshot_every == 0:
            snapshot(step, unet_ema, te_ema)
    return unet_ema, te_ema, done


def build_pipeline(vae, te, tokenizer, unet):
    """A StableDiffusionPipeline, or with ``te`` = [TE1, TE2] a StableDiffusionXLPipeline (one tokenizer for both;
    the unconditional embedding is the empty prompt's, as trained, not SDXL's zeros)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"})
    if isinstance(te, list):
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te[0], text_encoder_2=te[1], tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False, add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _write(pipe, folder: Path, record: dict) -> None:
    """Save a pipeline folder atomically (built beside it, then swapped in: ``atomic.atomic_dir``)."""
    with atomic_dir(folder) as work:
        pipe.save_pretrained(work, safe_serialization=True)
        (work / "PRETRAINING.json").write_text(json.dumps(record, indent=2))


def pretrain(out: str | Path, *, vae_steps: int = 3000, unet_steps: int = 3500, n_images: int = 20000,
             vae_batch: int = 16, unet_batch: int = 64, seed: int = 0, snapshot_every: int = 0) -> Path:
    """Run all stages and write a diffusers StableDiffusionPipeline folder to ``out`` (atomically).

    With ``snapshot_every``, the EMA pipeline at every multiple of it is also written to ``<out>.snapshot``
    (its PRETRAINING.json names the step), so quality can be watched while training runs.
    """
    from transformers import CLIPTokenizer

    out = Path(out)
    tok_dir = out.with_name(out.name + ".tokenizer")
    shutil.rmtree(tok_dir, ignore_errors=True)
    build_tokenizer_files(tok_dir, tw.vocabulary())
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    vae = train_vae(vae_steps, vae_batch, seed)
    latents, captions, scaling = encode_dataset(vae, n_images, seed + 1)
    vae.register_to_config(scaling_factor=scaling)
    print(f"latent scaling factor {scaling:.4f}", flush=True)

    def record(steps: int) -> dict:
        return dict(vae_steps=vae_steps, unet_steps=steps, n_images=n_images, vae_batch=vae_batch,
                    unet_batch=unet_batch, seed=seed,
                    command=f"python -m sdtune.toy.pretrain --out {out} --vae-steps {vae_steps} --unet-steps {steps}"
                            f" --images {n_images} --seed {seed}")

    def snapshot(step, unet, te):
        _write(build_pipeline(vae, te, tokenizer, unet), out.with_name(out.name + ".snapshot"), record(step))
        print(f"snapshot at step {step}", flush=True)

    unet, te, _ = train_unet(latents * scaling, captions, tokenizer, unet_steps, unet_batch, seed + 2,
                          snapshot=snapshot if snapshot_every else None, snapshot_every=snapshot_every or 1)
    _write(build_pipeline(vae, te, tokenizer, unet), out, record(unet_steps))
    return out


def build_sdxl(tokenizer, seed: int = 0):
    """The embedded SDXL base's untrained U-Net and [TE1, TE2] (``SDXL_UNET_CONFIG``, ``SDXL_TEXT_CONFIGS``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    tes = [cls(CLIPTextConfig(**ids, **cfg)) for cls, cfg in
           zip((CLIPTextModel, CLIPTextModelWithProjection), SDXL_TEXT_CONFIGS)]
    return UNet2DConditionModel(**SDXL_UNET_CONFIG), tes


def pretrain_sdxl(out: str | Path, *, base: str | Path, unet_steps: int = 3500, n_images: int = 20000,
                  unet_batch: int = 64, seed: int = 0, snapshot_every: int = 0) -> Path:
    """The embedded SDXL-family base: ``build_sdxl`` trained on the toy world (held-apart concepts excluded, a
    share in the held-in styles as in the SD1 base's second stage), reusing the VAE and tokenizer of the SD1 base
    ``base``; written as a StableDiffusionXLPipeline folder in fp16 (``SDXL_UNET_CONFIG`` explains the size)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    out, base = Path(out), Path(base)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    vae = AutoencoderKL.from_pretrained(base / "vae").requires_grad_(False)
    latents, captions, _ = encode_dataset(vae, n_images, seed + 1, style_rate=0.3)
    unet, tes = build_sdxl(tokenizer, seed)

    shown = base.resolve().relative_to(Path.cwd()) if base.resolve().is_relative_to(Path.cwd()) else base

    def record(steps: int) -> dict:
        return dict(arch="sdxl", base=str(shown), unet_steps=steps, n_images=n_images, unet_batch=unet_batch,
                    seed=seed, command=f"python -m sdtune.toy.pretrain --arch sdxl --base {shown} --out {out} "
                                       f"--unet-steps {steps} --images {n_images} --seed {seed}")

    def save(folder: Path, steps: int, unet_, tes_) -> None:  # fp16 copies: a snapshot's EMA trains on in fp32
        half = [copy.deepcopy(m).to(torch.float16) for m in (vae, *tes_, unet_)]
        _write(build_pipeline(half[0], half[1:3], tokenizer, half[3]), folder, record(steps))

    def snapshot(step, unet_, tes_):
        save(out.with_name(out.name + ".snapshot"), step, unet_, tes_)
        print(f"snapshot at step {step}", flush=True)

    unet, tes, _ = train_unet(latents * vae.config.scaling_factor, captions, tokenizer, unet_steps, unet_batch,
                              seed + 2, unet=unet, te=tes, snapshot=snapshot if snapshot_every else None,
                              snapshot_every=snapshot_every or 1)
    save(out, unet_steps, unet, tes)
    return out


def continue_pretraining(folder: str | Path, *, unet_steps: int, lr: float = 5e-4, n_images: int = 20000,
                         unet_batch: int = 64, seed: int = 1, style_rate: float = 0.0, out: str | Path | None = None,
                         prediction_type: str | None = None, zero_terminal_snr: bool = False,
                         max_minutes: float | None = None) -> Path:
    """Train an existing pipeline's U-Net and text encoder for ``unet_steps`` more steps on fresh scenes
    (data seed ``seed``; a share ``style_rate`` in the held-in styles), keeping the VAE and tokenizer; the stage is
    appended to PRETRAINING.json. Written to ``out`` (default: in place). ``prediction_type`` ("v_prediction")
    switches the target (a v-prediction twin); ``zero_terminal_snr`` also rescales the betas (Lin et al. 2024), and
    the saved scheduler then samples with them and trailing timesteps. ``max_minutes`` stops the training early; the
    record holds the steps actually done (the schedule does not depend on the step count, so its command repeats
    the run exactly). An SDXL folder trains both text encoders and is written in fp16 again, as ``pretrain_sdxl``
    writes it."""
    from ..models import _from_folder

    folder = Path(folder)
    out = Path(out) if out is not None else folder
    pipe = _from_folder(folder, torch.float32)
    sdxl = hasattr(pipe, "text_encoder_2")
    changes = {"prediction_type": prediction_type} if prediction_type else {}
    if zero_terminal_snr:
        changes |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    if changes:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **changes)
    latents, captions, _ = encode_dataset(pipe.vae, n_images, 1000 + seed, style_rate=style_rate)
    unet, te, unet_steps = train_unet(latents * pipe.vae.config.scaling_factor, captions, pipe.tokenizer, unet_steps,
                                      unet_batch, 2000 + seed, lr=lr, unet=pipe.unet,
                                      te=[pipe.text_encoder, pipe.text_encoder_2] if sdxl else pipe.text_encoder,
                                      scheduler_config=dict(pipe.scheduler.config),
                                      max_seconds=None if max_minutes is None else 60 * max_minutes)
    pipe.unet = unet
    if sdxl:
        pipe.text_encoder, pipe.text_encoder_2 = te
        pipe = pipe.to(torch.float16)
    else:
        pipe.text_encoder = te
    record = json.loads((folder / "PRETRAINING.json").read_text())
    target = (f" --out {out}" if out != folder else "") + (f" --prediction-type {prediction_type}"
                                                         if prediction_type else "") \
        + (" --zero-terminal-snr" if zero_terminal_snr else "")
    record.setdefault("continued", []).append(dict(
        unet_steps=unet_steps, lr=lr, n_images=n_images, unet_batch=unet_batch, seed=seed, style_rate=style_rate,
        prediction_type=pipe.scheduler.config.prediction_type, zero_terminal_snr=zero_terminal_snr,
        command=f"python -m sdtune.toy.pretrain --continue-from {folder} --unet-steps {unet_steps} --lr {lr} "
                f"--images {n_images} --seed {seed} --style-rate {style_rate}{target}"))
    _write(pipe, out, record)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Pretrain the embedded tiny Stable Diffusion on the toy world.")
    p.add_argument("--out", default=None, help="output folder (default: assets/tiny-sd; with --continue-from: in "
                                                "place)")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=3500)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continue-from", default=None, help="train an existing pipeline folder further (U-Net + TE)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate with --continue-from")
    p.add_argument("--style-rate", type=float, default=0.0,
                   help="with --continue-from: share of scenes drawn in a held-in style (world.HELD_IN_STYLES)")
    p.add_argument("--snapshot-every", type=int, default=0, help="write <out>.snapshot every N U-Net steps")
    p.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1",
                   help="sdxl: the embedded SDXL-family base (default --out assets/tiny-sdxl), on --base's VAE")
    p.add_argument("--base", default=None, help="with --arch sdxl: the SD1 base whose VAE and tokenizer are reused "
                                                "(default: the embedded one)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="with --continue-from: train on this target from now on (a v-prediction twin)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="with --continue-from: stop the U-Net training after this many minutes (the record says "
                        "how many steps were done)")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="with --continue-from: rescale the betas to zero terminal SNR (v_prediction only)")
    a = p.parse_args()
    if a.continue_from:
        if a.zero_terminal_snr and a.prediction_type != "v_prediction":
            p.error("--zero-terminal-snr needs --prediction-type v_prediction")
        continue_pretraining(a.continue_from, unet_steps=a.unet_steps, lr=a.lr, n_images=a.images, seed=a.seed,
                             style_rate=a.style_rate, out=a.out, prediction_type=a.prediction_type,
                             zero_terminal_snr=a.zero_terminal_snr, max_minutes=a.max_minutes)
    elif a.arch == "sdxl":
        from ..models import EMBEDDED

        pretrain_sdxl(a.out or "assets/tiny-sdxl", base=a.base or EMBEDDED, unet_steps=a.unet_steps,
                      n_images=a.images, seed=a.seed, snapshot_every=a.snapshot_every)
    else:
        pretrain(a.out or "assets/tiny-sd", vae_steps=a.vae_steps, unet_steps=a.unet_steps, n_images=a.images,
                 seed=a.seed, snapshot_every=a.snapshot_every)


if __name__ == "__main__":
    main()
