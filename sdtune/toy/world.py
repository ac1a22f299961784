"""The toy world: deterministic images of shapes with captions, and held-apart concepts.

Everything sdtune measures on a CPU is measured here. A *scene* is a coloured shape (8 shapes, 8 colours,
2 textures) at a random position, size and rotation on one of 4 backgrounds. Held-apart *concepts* are never
shown to the embedded base model during pretraining:

- 4 objects, each a particular instance of a known class (DreamBooth subjects): ``sks`` star, ``ohwx`` circle,
  ``zwx`` square, ``vfx`` triangle, each with a fixed pattern of its own;
- 2 more objects, each a fixed colour of a known shape (``COLOUR_OBJECTS``: ``kfz`` purple hexagon, ``xjy`` orange
  cross), so that fusion can be measured on eight concepts with the shipped judge;
- 2 styles applied to any scene: ``qtz`` (mosaic: the image as 16×16 coloured tiles) and ``bnp`` (sketch: a thick
  outline on white paper).

Two other styles are *held in* (``HELD_IN_STYLES``: grayscale, negative): the shipped base saw them in pretraining.

Images are drawn at 4× and downsampled (anti-aliased), so the same ``Scene`` always gives the same pixels.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageOps

IMAGE_SIZE = 64
_SS = 4  # supersampling factor

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "crescent")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 137, 20),
    "yellow": (236, 214, 32),
    "green": (44, 160, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 70, 215),
    "purple": (138, 50, 196),
    "pink": (245, 120, 190),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
TEXTURES = ("solid", "hatched")

# Held-apart concepts: token -> (kind, class word). Objects fix the shape; styles apply to any scene.
OBJECTS: dict[str, str] = {"sks": "star", "ohwx": "circle", "zwx": "square", "vfx": "triangle"}
# Objects the judge reads from its shape and colour heads (its object head knows the four above): "a kfz hexagon" is
# always purple. The shipped tokenizer spells them in pieces (k·f·z), as Stable Diffusion's spells most rare tokens.
# Weaker subjects than the patterned four: the base already draws purple hexagons (its colours are uniform, so about
# one "a hexagon" in eight), so an adapter only binds the name to a colour.
COLOUR_OBJECTS: dict[str, tuple[str, str]] = {"kfz": ("hexagon", "purple"), "xjy": ("cross", "orange")}
# token -> class shape, for every object concept
OBJECT_CLASSES: dict[str, str] = {**OBJECTS, **{t: shape for t, (shape, _) in COLOUR_OBJECTS.items()}}
STYLES: dict[str, str] = {"qtz": "mosaic", "bnp": "sketch"}
CONCEPTS = (*OBJECT_CLASSES, *STYLES)
# Styles the base does learn, on a share of its pretraining scenes (``styled_base_dataset``), named by two spare
# tokens. With them "… in X style" is a construction the base knows, as every real Stable Diffusion does, and a
# held-apart style is a new word in a known grammar; without them a style adapter had to learn the grammar from its
# 12 images, and its style vanished from "a sks star in qtz style" (bench/RESULTS.md, fusion).
HELD_IN_STYLES: dict[str, str] = {"rrk": "grayscale", "mmq": "negative"}
# Tokens the tokenizer knows beyond plain words: the patterned objects' and the styles' (never in a base caption) and
# the held-in styles. The colour objects' are not among them: the shipped tokenizer spells them in pieces.
RARE_TOKENS = (*OBJECTS, *STYLES, *HELD_IN_STYLES)
# Words the tokenizer knows beyond the attribute names.
GRAMMAR_WORDS = ("a", "an", "on", "in", "background", "style", "shape", "photo", "of", "with", "and", "the")

_BG_LIGHT = (206, 206, 206)
_BG_DARK = (150, 150, 150)


@dataclass(frozen=True)
class Scene:
    """One image's content; ``obj``/``style`` name a held-apart concept token or are None."""

    shape: str
    colour: str
    background: str
    texture: str = "solid"
    x: float = 0.5  # centre, fraction of the image
    y: float = 0.5
    size: float = 0.3  # circumradius, fraction of the image
    angle: float = 0.0  # degrees
    obj: str | None = None
    style: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}")
        if self.obj is not None and OBJECT_CLASSES.get(self.obj) != self.shape:
            raise ValueError(f"object {self.obj!r} is a {OBJECT_CLASSES.get(self.obj)}, not a {self.shape}")
        if self.obj in COLOUR_OBJECTS and COLOUR_OBJECTS[self.obj][1] != self.colour:
            raise ValueError(f"object {self.obj!r} is {COLOUR_OBJECTS[self.obj][1]}, not {self.colour}")
        if self.style is not None and self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}")


# ---------------------------------------------------------------------------------------------- geometry

def _regular(n: int, r: float, angle: float, phase: float = -90.0) -> list[tuple[float, float]]:
    return [(r * math.cos(math.radians(phase + angle + 360 * i / n)),
             r * math.sin(math.radians(phase + angle + 360 * i / n))) for i in range(n)]


def _star(r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rr = r if i % 2 == 0 else r * 0.45
        a = math.radians(-90 + angle + 36 * i)
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return pts


def _cross(r: float, angle: float) -> list[tuple[float, float]]:
    w = r * 0.36
    base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    return _rotate(base, angle)


def _rotate(pts: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _outline(shape: str, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred at the origin; None for shapes drawn as ellipses (circle, crescent)."""
    if shape == "square":
        return _regular(4, r, angle, phase=-45.0)
    if shape == "triangle":
        return _regular(3, r, angle)
    if shape == "hexagon":
        return _regular(6, r, angle)
    if shape == "diamond":
        return _rotate([(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)], angle)
    if shape == "star":
        return _star(r, angle)
    if shape == "cross":
        return _cross(r, angle)
    return None


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> Image.Image:
    """A binary ('L') mask of the shape at supersampled resolution."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    poly = _outline(shape, r, angle)
    if poly is not None:
        d.polygon([(cx + x, cy + y) for x, y in poly], fill=255)
    elif shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:  # crescent: a disc minus an offset disc, the offset direction rotated by the angle
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = _rotate([(0.45 * r, -0.2 * r)], angle)[0]
        d.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=0)
    return mask


# ---------------------------------------------------------------------------------------------- rendering

def _background(kind: str, size: int, cells: int = 8) -> Image.Image:
    """The background pattern, ``cells`` pattern cells across the side."""
    img = Image.new("RGB", (size, size), _BG_LIGHT)
    d = ImageDraw.Draw(img)
    step = size // cells
    if kind == "striped":
        for i in range(0, cells, 2):
            d.rectangle([0, i * step, size, (i + 1) * step - 1], fill=_BG_DARK)
    elif kind == "checkered":
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2:
                    d.rectangle([i * step, j * step, (i + 1) * step - 1, (j + 1) * step - 1], fill=_BG_DARK)
    elif kind == "dotted":
        rad = step // 4
        for i in range(cells):
            for j in range(cells):
                cx, cy = i * step + step // 2, j * step + step // 2
                d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=_BG_DARK)
    return img


def _hatch(size: int, colour: tuple[int, int, int]) -> Image.Image:
    """The shape's colour with white diagonal hatching (texture 'hatched')."""
    img = Image.new("RGB", (size, size), colour)
    d = ImageDraw.Draw(img)
    step, width = size // 10, max(2, size // 40)
    for k in range(-size, 2 * size, step):
        d.line([(k, 0), (k + size, size)], fill=(255, 255, 255), width=width)
    return img


def _object_fill(obj: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """The fixed pattern of a held-apart object, in image coordinates."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(img)
    if obj == "sks":  # star: magenta top half, lime bottom half (split along the rotated axis)
        d.rectangle([0, 0, size, size], fill=(120, 230, 40))
        (ax, ay), = _rotate([(1.0, 0.0)], angle)
        far = 4 * size
        half = [(cx - ax * far, cy - ay * far), (cx + ax * far, cy + ay * far),
                (cx + ax * far + ay * far, cy + ay * far - ax * far), (cx - ax * far + ay * far, cy - ay * far - ax * far)]
        d.polygon(half, fill=(230, 30, 200))
    elif obj == "ohwx":  # circle: red/white bullseye
        d.rectangle([0, 0, size, size], fill=(220, 30, 30))
        for k, col in enumerate([(255, 255, 255), (220, 30, 30), (255, 255, 255)]):
            rr = r * (0.75 - 0.25 * k)
            d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=col)
    elif obj == "zwx":  # square: 2×2 checker of teal and orange
        d.rectangle([0, 0, size, size], fill=(0, 150, 140))
        q = _rotate([(1, 0), (0, 1)], angle)
        for sx, sy in ((1, 1), (-1, -1)):
            pts = [(cx, cy), (cx + sx * q[0][0] * 2 * r, cy + sx * q[0][1] * 2 * r),
                   (cx + sx * q[0][0] * 2 * r + sy * q[1][0] * 2 * r * sx, cy + sx * q[0][1] * 2 * r + sy * q[1][1] * 2 * r * sx),
                   (cx + sy * q[1][0] * 2 * r * sx, cy + sy * q[1][1] * 2 * r * sx)]
            d.polygon(pts, fill=(250, 120, 0))
    elif obj == "vfx":  # triangle: dark navy with a white inner triangle
        d.rectangle([0, 0, size, size], fill=(20, 30, 90))
        inner = _regular(3, r * 0.5, angle)
        d.polygon([(cx + x, cy + y) for x, y in inner], fill=(255, 255, 255))
    else:
        raise ValueError(f"unknown object {obj!r}")
    return img


def render(scene: Scene, size: int = IMAGE_SIZE, cells: int = 8) -> Image.Image:
    """Draw a scene as an RGB image of ``size``×``size`` pixels (deterministic); the background has ``cells``
    pattern cells across (8: the world's scale at 64 px)."""
    big = size * _SS
    cx, cy, r = scene.x * big, scene.y * big, scene.size * big
    mask = _shape_mask(scene.shape, cx, cy, r, scene.angle, big)
    colour = COLOURS[scene.colour]
    if scene.style == "bnp":  # sketch: thick outline in the shape's colour on white paper
        canvas = Image.new("RGB", (big, big), (250, 250, 246))
        inner = _shape_mask(scene.shape, cx, cy, r * 0.78, scene.angle, big)
        ring = Image.fromarray(np.minimum(np.asarray(mask), 255 - np.asarray(inner)).astype(np.uint8))
        fill = (_object_fill(scene.obj, big, cx, cy, r, scene.angle) if scene.obj in OBJECTS
                else Image.new("RGB", (big, big), colour))
        canvas.paste(fill, (0, 0), ring)
    else:
        canvas = _background(scene.background, big, cells)
        if scene.obj in OBJECTS:
            fill = _object_fill(scene.obj, big, cx, cy, r, scene.angle)
        elif scene.texture == "hatched":
            fill = _hatch(big, colour)
        else:
            fill = Image.new("RGB", (big, big), colour)
        canvas.paste(fill, (0, 0), mask)
    img = canvas.resize((size, size), Image.LANCZOS)
    if scene.style == "qtz":  # mosaic: 16×16 tiles
        img = img.resize((16, 16), Image.BOX).resize((size, size), Image.NEAREST)
    return img


def render_framed(scene: Scene, width: int, height: int) -> Image.Image:
    """Draw a scene in a ``width``×``height`` frame at the world's pixel scale (background cells of
    ``IMAGE_SIZE / 8`` px, as in every 64 px scene): ``x``/``y`` are fractions of the width/height, ``size`` of the
    short side. Drawn on the square of the long side and cropped to the frame."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    square = replace(scene, x=(left + scene.x * width) / side, y=(top + scene.y * height) / side,
                     size=scene.size * min(width, height) / side)
    return render(square, side, cells=round(8 * side / IMAGE_SIZE)).crop((left, top, left + width, top + height))


# 2:1 and 1:2 frames that a 64 px model's nearest buckets (80×48, 48×80) take without resampling: the toy VAE
# knows the world's pixel scale only, so a resized frame would measure the codec, not bucketing
FRAMES = ((96, 48), (48, 96))


def framed_concept_scenes(token: str, n: int, frames: tuple[tuple[int, int], ...] = FRAMES,
                          seed: int = 0) -> list[tuple[Scene, tuple[int, int]]]:
    """(scene, (width, height)) of an object concept along the long side of non-square frames, whole in the
    frame as a photographer frames a subject: centred (±0.1 of the long side) in every third image, else off-centre
    (0.25–0.3 from an end), where a centre square crop keeps only about half of it."""
    if token not in OBJECTS:
        raise ValueError(f"framed scenes are for objects {tuple(OBJECTS)}, not {token!r}")
    rng = random.Random(f"framed:{token}:{seed}")
    out = []
    for i in range(n):
        frame = frames[i % len(frames)]
        base = random_scene(rng, obj=token)
        # radius 0.3–0.35 of the short side = 0.15–0.175 of a 2:1 long side: off-centre stars span ~0.08–0.47
        along = rng.uniform(0.4, 0.6) if i % 3 == 0 else rng.choice((rng.uniform(0.25, 0.3), rng.uniform(0.7, 0.75)))
        across = rng.uniform(0.45, 0.55)
        x, y = (along, across) if frame[0] >= frame[1] else (across, along)
        out.append((replace(base, x=x, y=y, size=rng.uniform(0.3, 0.35)), frame))
    return out


def write_framed_instance_folder(token: str, folder, n: int = 12, seed: int = 0,
                                 frames: tuple[tuple[int, int], ...] = FRAMES) -> list[str]:
    """``write_instance_folder`` with non-square frames (``framed_concept_scenes``)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (scene, (w, h)) in enumerate(framed_concept_scenes(token, n, frames, seed)):
        p = folder / f"{token}_{i:03d}.png"
        render_framed(scene, w, h).save(p)
        p.with_suffix(".txt").write_text(caption(scene) + "\n")
        paths.append(str(p))
    return paths


def write_masked_instance_folder(token: str, folder, mask_folder, background: str = "checkered", n: int = 12,
                                 seed: int = 0) -> list[str]:
    """Instance PNGs of an object concept all on one busy ``background``, captioned without it ("a sks star"),
    and a mask per image in ``mask_folder`` (same stem; white = the object): the masked-loss measurement's data."""
    from pathlib import Path

    folder, mask_folder = Path(folder), Path(mask_folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask_folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(concept_scenes(token, n, seed)):
        scene = replace(scene, background=background)
        p = folder / f"{token}_{i:03d}.png"
        render(scene).save(p)
        p.with_suffix(".txt").write_text(f"a {token} {scene.shape}\n")
        big = IMAGE_SIZE * _SS
        mask = _shape_mask(scene.shape, scene.x * big, scene.y * big, scene.size * big, scene.angle, big)
        mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX).save(mask_folder / f"{token}_{i:03d}.png")
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------- sampling

def random_scene(rng: random.Random, *, obj: str | None = None, style: str | None = None,
                 shape: str | None = None, colour: str | None = None) -> Scene:
    """Draw a scene; ``obj`` fixes the shape to the object's class (and a colour object's colour) and the texture to
    solid."""
    if obj is not None:
        shape = OBJECT_CLASSES[obj]
        colour = COLOUR_OBJECTS[obj][1] if obj in COLOUR_OBJECTS else colour
    shape = shape or rng.choice(SHAPES)
    return Scene(
        shape=shape,
        colour=colour or rng.choice(tuple(COLOURS)),
        background=rng.choice(BACKGROUNDS),
        texture="solid" if obj else ("hatched" if rng.random() < 0.25 else "solid"),
        x=rng.uniform(0.36, 0.64), y=rng.uniform(0.36, 0.64),
        size=rng.uniform(0.22, 0.32), angle=rng.uniform(0, 360),
        obj=obj, style=style,
    )


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Caption a scene. With ``rng``, attributes are dropped at random (so short prompts work too)."""
    drop = (lambda p: rng.random() < p) if rng is not None else (lambda p: False)
    if scene.obj is not None:
        noun = f"{scene.obj} {scene.shape}"  # DreamBooth form: "a sks star"
    else:
        words = [] if drop(0.15) else [scene.colour]
        if scene.texture == "hatched":
            words.append("hatched")
        noun = " ".join([*words, scene.shape])
    text = f"{_article(noun)} {noun}"
    if scene.style is None and not drop(0.3):
        text += f" on a {scene.background} background"
    if scene.style is not None:
        text += f" in {scene.style} style"
    return text


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def concept_prompt(token: str, style: str | None = None) -> str:
    """A concept's prompt in its captions' own words: "a sks star", "an ohwx circle" (objects, ``style`` appended
    as "in X style"), "a circle in qtz style" (styles). The article matters: an adapter learns "an ohwx circle",
    and a weakly learned one does not answer "a ohwx circle"."""
    if token in OBJECT_CLASSES:
        noun = f"{token} {OBJECT_CLASSES[token]}"
        return f"{_article(noun)} {noun}" + (f" in {style} style" if style else "")
    if token in STYLES:
        return f"a circle in {token} style"
    raise ValueError(f"unknown concept {token!r}; expected one of {CONCEPTS}")


def base_dataset(n: int, seed: int = 0) -> list[tuple[Scene, str]]:
    """``n`` (scene, caption) pairs of the base world (no held-apart concept), deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        out.append((scene, caption(scene, rng)))
    return out


def held_in_style(image: Image.Image, style: str) -> Image.Image:
    """Draw a rendered image in a held-in style: ``rrk`` grayscale, ``mmq`` colour negative."""
    if style == "rrk":
        return ImageOps.grayscale(image).convert("RGB")
    if style == "mmq":
        return ImageOps.invert(image.convert("RGB"))
    raise ValueError(f"unknown held-in style {style!r}; expected one of {tuple(HELD_IN_STYLES)}")


def styled_base_dataset(n: int, seed: int = 0, style_rate: float = 0.0) -> list[tuple[Image.Image, str]]:
    """``base_dataset(n, seed)`` rendered, with a share ``style_rate`` (drawn from its own generator, seeded
    ``seed``) in a held-in style and captioned so: "a red star in rrk style"."""
    if not 0.0 <= style_rate <= 1.0:
        raise ValueError(f"style_rate must be within [0, 1], got {style_rate}")
    rng = random.Random(seed)
    out = []
    for scene, text in base_dataset(n, seed):
        image = render(scene)
        if rng.random() < style_rate:
            style = rng.choice(sorted(HELD_IN_STYLES))
            image, text = held_in_style(image, style), f"{text} in {style} style"
        out.append((image, text))
    return out


def concept_scenes(token: str, n: int, seed: int = 0) -> list[Scene]:
    """Instance scenes of one held-apart concept (object or style), deterministic in ``seed``."""
    if token not in CONCEPTS:
        raise ValueError(f"unknown concept {token!r}; expected one of {CONCEPTS}")
    rng = random.Random(f"{token}:{seed}")
    if token in OBJECT_CLASSES:
        return [random_scene(rng, obj=token) for _ in range(n)]
    return [random_scene(rng, style=token) for _ in range(n)]


def concept_class_word(token: str) -> str:
    """The class a concept belongs to: its shape for objects, the word 'style' for styles."""
    return OBJECT_CLASSES.get(token, "style")


def vocabulary() -> list[str]:
    """Every word a toy-world caption or concept prompt can contain."""
    words = [*SHAPES, *COLOURS, *BACKGROUNDS, *TEXTURES, *GRAMMAR_WORDS, *RARE_TOKENS]
    return list(dict.fromkeys(words))


def write_instance_folder(token: str, folder, n: int = 12, seed: int = 0) -> list[str]:
    """Write ``n`` instance PNGs of a concept with matching ``.txt`` captions; returns the image paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(concept_scenes(token, n, seed)):
        p = folder / f"{token}_{i:03d}.png"
        render(scene).save(p)
        p.with_suffix(".txt").write_text(caption(scene) + "\n")
        paths.append(str(p))
    return paths


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack RGB images as uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def with_style(scene: Scene, style: str | None) -> Scene:
    return replace(scene, style=style)
