"""Scan: find a folder's images, captions and masks, and check each from its header before training starts.

    found = scan_folder("data/sks", Source(prompt="a sks star"))   # -> Scan(examples, problems, notes)
    require([found], skip_bad=False)                                 # one DataError naming every unusable file

Nothing is decoded but to prove that the file decodes (after the pixel cap has passed on the header): training
never meets a broken file halfway. A symlink is followed only while its target stays inside the folder. Files
with extensions that are neither images nor sidecars (captions, masks, caches), and sub-folders when not
recursive, are listed once in a warning, never silently ignored.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .captions import CaptionError, CaptionPolicy, read_caption
from .intake import DEFAULT_MAX_PIXELS, UnusableImage, decode, probe

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# files that sit beside images in trainers' folders and are not images: not worth a warning
SIDECAR_EXTS = (".txt", ".caption", ".json", ".npz", ".npy", ".toml", ".yaml", ".yml", ".md", ".safetensors")


class DataError(ValueError):
    """The training data cannot be used; the message names the folder or file(s)."""


@dataclass(frozen=True)
class Example:
    """One training image: its file, its caption, its size as displayed (w, h; EXIF applied), its mask (a file,
    "alpha" for its own alpha channel, or None) and the caption policy of its subset."""

    path: str
    caption: str
    size: tuple[int, int] | None = None
    mask: str | None = None
    policy: CaptionPolicy = CaptionPolicy()


@dataclass(frozen=True)
class Source:
    """Where a set of examples comes from and how it is read (one [data] section or one subset)."""

    prompt: str | None = None          # fallback caption for images without a caption file
    caption_ext: str = ".txt"
    recursive: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    mask_dir: str | None = None        # masks with the images' stems (and relative folders)
    alpha_mask: bool = False           # the image's alpha channel is its mask
    policy: CaptionPolicy = CaptionPolicy()


@dataclass
class Scan:
    folder: Path
    examples: list[Example] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file relative to folder, why)
    total: int = 0                                                  # image files found


def _inside(path: Path, root: Path) -> bool:
    """Does ``path`` (after resolving symlinks) stay inside ``root`` (resolved)?"""
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # outside, or a symlink loop
        return False


def _walk(folder: Path, recursive: bool, exclude: Path | None) -> tuple[list[Path], list[Path], list[Path]]:
    """(files, sub-folders not entered, symlinked folders not followed), sorted; hidden names and ``exclude``
    (the mask folder, when it sits inside) are skipped."""
    files, skipped, linked = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (base / d).resolve() != exclude))
        for d in list(dirnames):
            if (base / d).is_symlink():
                linked.append(base / d)
                dirnames.remove(d)
        if not recursive:
            skipped += [base / d for d in dirnames]
            dirnames.clear()
        files += [base / n for n in sorted(filenames) if not n.startswith(".")]
    return files, skipped, linked


def _find_mask(image: Path, folder: Path, mask_dir: Path) -> Path | None:
    rel = image.relative_to(folder).with_suffix("")
    for ext in IMAGE_EXTS:
        cand = mask_dir / rel.with_name(rel.name + ext)
        if cand.is_file():
            return cand
    return None


def scan_folder(folder: str | Path, source: Source = Source(),
                check: Callable[[tuple[int, int]], str | None] | None = None) -> Scan:
    """Every image in ``folder`` as an Example, or a problem saying why it cannot be used. ``check(size)``
    returns why an image of that (oriented) size cannot be trained (e.g. too small for its bucket), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"instance folder not found: {folder}")
    root = folder.resolve()
    mask_dir = Path(source.mask_dir) if source.mask_dir else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise DataError(f"mask folder not found: {mask_dir}")
    files, skipped, linked = _walk(folder, source.recursive, mask_dir.resolve() if mask_dir else None)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    captions_ext = {source.caption_ext.lower(), *SIDECAR_EXTS}
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTS and p.suffix.lower() not in captions_ext]
    notes = []
    if others:
        notes.append(f"{len(others)} file(s) with unsupported extensions ignored (sdtune reads "
                     f"{', '.join(IMAGE_EXTS)}): " + _names(others, folder))
    if skipped:
        notes.append(f"{len(skipped)} sub-folder(s) not read (set data.recursive = true to include them): "
                     + _names(skipped, folder))
    if linked:
        notes.append(f"{len(linked)} symlinked folder(s) not followed: " + _names(linked, folder))
    if notes:
        warnings.warn(f"{folder}: " + "\n  ".join(notes), stacklevel=3)
    out = Scan(folder, total=len(images))
    for p in images:
        name = str(p.relative_to(folder))
        why, example = _example(p, folder, root, source, mask_dir, check)
        if why is None:
            out.examples.append(example)
        else:
            out.problems.append((name, why))
    return out


def _example(p: Path, folder: Path, root: Path, source: Source, mask_dir: Path | None,
             check) -> tuple[str | None, Example | None]:
    """(None, the Example) or (why the image cannot be used, None)."""
    if not _inside(p, root):
        return "a symlink to a file outside the folder (not followed)", None
    try:
        info = probe(p, max_pixels=source.max_pixels)
        decode(p, max_pixels=source.max_pixels)  # truncated data fails here, not mid-training
    except UnusableImage as e:
        return str(e), None
    if check is not None and (why := check(info.size)) is not None:
        return why, None
    cap = p.with_suffix(source.caption_ext)
    caption = None
    if cap.is_file():
        if not _inside(cap, root):
            return f"its caption {cap.name} is a symlink to outside the folder (not followed)", None
        try:
            caption = read_caption(cap) or None
        except CaptionError as e:
            return f"caption {cap.name}: {e}", None
    if caption is None:
        caption = source.prompt
    if caption is None:
        return f"no caption: write {cap.name} (or set the folder's prompt, data.instance_prompt)", None
    mask = None
    if mask_dir is not None:
        found = _find_mask(p, folder, mask_dir)
        if found is None:
            return f"no mask with its name in {mask_dir}", None
        try:
            msize = probe(found, max_pixels=source.max_pixels).size
        except UnusableImage as e:
            return f"mask {found.name}: {e}", None
        if abs(msize[0] / msize[1] - info.size[0] / info.size[1]) > 0.01 * info.size[0] / info.size[1]:
            return f"mask {found.name} is {msize[0]}×{msize[1]}, the image {info.size[0]}×{info.size[1]}", None
        mask = str(found)
    elif source.alpha_mask and info.has_alpha:
        mask = "alpha"
    return None, Example(str(p), caption, info.size, mask, source.policy)


def _names(paths: list[Path], folder: Path, limit: int = 12) -> str:
    names = [str(p.relative_to(folder)) for p in paths]
    return ", ".join(names[:limit]) + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


def require(scans: list[Scan], *, skip_bad: bool = False) -> list[Example]:
    """The examples of every scan, or ONE DataError that names each unusable file (a warning with ``skip_bad``)."""
    for s in scans:
        if not s.total:
            raise DataError(f"instance folder {s.folder} has no images ({', '.join(IMAGE_EXTS)})")
    bad = [(s.folder, name, why) for s in scans for name, why in s.problems]
    if bad:
        total = sum(s.total for s in scans)
        where = str(scans[0].folder) if len(scans) == 1 else f"{len(scans)} folders"
        listing = "\n  ".join(f"{name}: {why}" if len(scans) == 1 else f"{folder / name}: {why}"
                              for folder, name, why in bad)
        if not skip_bad:
            raise DataError(f"{len(bad)} of {total} image(s) in {where} cannot be used:\n  {listing}\n"
                            f"Fix or remove them, or set data.skip_bad_images = true to train without them.")
        warnings.warn(f"skipping {len(bad)} image(s) in {where}:\n  {listing}", stacklevel=3)
    out = [e for s in scans for e in s.examples]
    if not out:
        raise DataError(f"no usable images left in {', '.join(str(s.folder) for s in scans)}")
    return out
