"""Generation: prompts -> images and a labelled grid, with PNG metadata saying how each was made."""
from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .atomic import atomic_path, write_text
from .models import model_multiple


@dataclass
class SampleRequest:
    """What to generate. ``count`` images per prompt; image i of a prompt uses seed ``seed + i``."""

    prompts: list[str]
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    size: int | None = None  # None: the model's native resolution
    width: int | None = None  # overrides size for that side (non-square samples, e.g. a portrait bucket)
    height: int | None = None
    count: int = 1
    adapters: list[tuple[str, float]] = field(default_factory=list)  # (A1111/kohya file, weight), applied while sampling
    blocks: list[str | None] = field(default_factory=list)  # per adapter: block weights (``sdtune.blocks``) or None
    guidance_rescale: float = 0.0  # φ of Lin et al. 2024 §3.4: mix of the guided prediction rescaled to the
    #                                conditional one's standard deviation (0.7 suits zero-terminal-SNR models)
    zero_terminal_snr: bool = False  # sample with zero-terminal-SNR betas and trailing timesteps (``schedules``)
    regions: list[str | None] = field(default_factory=list)  # composed sampling: per adapter, where its phrase acts
    #                                                           ("left", "0:0:0.5:1", ...; ``compose.region_box``)

    def __post_init__(self) -> None:
        if not self.prompts or any(not isinstance(p, str) for p in self.prompts):
            raise ValueError("at least one prompt (a string) is required")
        if self.steps < 1 or self.count < 1:
            raise ValueError("steps and count must be >= 1")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        for name in ("size", "width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"{name} must be a multiple of 8, got {v}")

    def dims(self, native: int) -> tuple[int, int]:
        """(width, height) in pixels: width/height, else size, else the model's ``native`` resolution."""
        side = self.size or native
        return self.width or side, self.height or side


@dataclass
class Sample:
    image: Image.Image
    prompt: str
    seed: int


def generate(model, request: SampleRequest, *, progress: bool = True) -> list[Sample]:
    """Run the pipeline of a loaded :class:`sdtune.models.BaseModel` for every prompt × count, with
    ``request.adapters`` added into the weights for the duration (and removed exactly afterwards).

    Each image has its own generator seeded ``seed + i`` so any single image can be reproduced alone.
    """
    from .schedules import sampling_schedule
    from .blocks import apply_file

    with ExitStack() as applied:
        applied.enter_context(sampling_schedule(model.pipeline, request.zero_terminal_snr))
        for i, (path, weight) in enumerate(request.adapters):
            blocks = request.blocks[i] if i < len(request.blocks) else None
            applied.enter_context(apply_file(model.components(), model.arch, path, weight, blocks))
        return _generate(model, request, progress)


@torch.no_grad()
def _generate(model, request: SampleRequest, progress: bool) -> list[Sample]:
    pipe = model.pipeline
    width, height = request.dims(model.resolution)
    m = model_multiple(pipe)
    if width % m or height % m:
        raise ValueError(f"{width}×{height}: this model needs sides that are multiples of {m} (VAE scale × U-Net "
                         f"downsamplings)")
    device = pipe.unet.device
    out: list[Sample] = []
    jobs = [(p, request.seed + i) for p in request.prompts for i in range(request.count)]
    bar = tqdm(total=len(jobs), desc="sampling", unit="img", disable=not progress)
    for prompt in request.prompts:
        seeds = [request.seed + i for i in range(request.count)]
        gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        images = pipe(
            prompt=[prompt] * len(seeds), negative_prompt=[request.negative_prompt] * len(seeds),
            num_inference_steps=request.steps, guidance_scale=request.guidance, height=height, width=width,
            generator=gens, guidance_rescale=request.guidance_rescale,
        ).images
        out += [Sample(im, prompt, s) for im, s in zip(images, seeds)]
        bar.update(len(seeds))
    bar.close()
    return out


def grid(images: list[Image.Image], columns: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images row by row (``columns`` defaults to a near-square layout)."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST) if scale > 1 else sheet


def png_info(request: SampleRequest, sample: Sample, model_source: str, composed: bool = False
             ) -> PngImagePlugin.PngInfo:
    """sdtune's own JSON record plus A1111's ``parameters`` infotext. ``composed``: made by ``sdtune.compose``
    (each adapter on its own bracketed phrase), which the image cannot be remade without."""
    info = PngImagePlugin.PngInfo()
    params = {"prompt": sample.prompt, "negative_prompt": request.negative_prompt, "seed": sample.seed,
              "steps": request.steps, "guidance": request.guidance, "guidance_rescale": request.guidance_rescale,
              "zero_terminal_snr": request.zero_terminal_snr, "model": model_source,
              "adapters": [{"file": f, "weight": w} | ({"blocks": request.blocks[i]} if i < len(request.blocks)
                                                         and request.blocks[i] else {})
                           for i, (f, w) in enumerate(request.adapters)], "composed": composed}
    if composed and any(request.regions):
        params["regions"] = list(request.regions)
    info.add_text("sdtune", json.dumps(params))
    info.add_text("parameters", f"{sample.prompt}\nNegative prompt: {request.negative_prompt}\n"
                                f"Steps: {request.steps}, CFG scale: {request.guidance}, Seed: {sample.seed}"
                                + (", sdtune compose: true" if composed else ""))
    return info


def save_samples(samples: list[Sample], request: SampleRequest, out_dir: str | Path, model_source: str,
                 columns: int | None = None, composed: bool = False) -> dict[str, object]:
    """Write each image (with metadata; ``composed`` as in :func:`png_info`) and a grid (one row per prompt), each
    file atomically (``sdtune.atomic``); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(samples):
        p = out_dir / f"{i:04d}_seed{s.seed}.png"
        with atomic_path(p) as tmp:
            s.image.save(tmp, format="PNG", pnginfo=png_info(request, s, model_source, composed))
        paths.append(str(p))
    if columns is None and len(request.prompts) > 1:
        columns = request.count  # one row per prompt
    sheet = grid([s.image for s in samples], columns)
    grid_path = out_dir / "grid.png"
    with atomic_path(grid_path) as tmp:
        sheet.save(tmp, format="PNG")
    write_text(out_dir / "request.json", json.dumps(asdict(request), indent=2))
    return {"images": paths, "grid": str(grid_path)}
