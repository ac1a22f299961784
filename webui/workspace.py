"""The web UI's file rules: every path lives inside one workspace folder, uploads are checked before they are kept.

Layout (created on first use):
    library/     adapter files (*.safetensors): trained results, blends, imports
    uploads/     instance images uploaded for training, one folder per upload
    runs/        training run folders (``sdtune.train.loop`` output)
    samples/     generated images, one folder per request
    merged/      merged checkpoints
    class_images/ prior-preservation caches
    .cache/      the web server's private upload and temp folder (mode 0700; Gradio's cache)
Any other folder inside the workspace can hold instance images (``folder`` on the Train tab). Entries that resolve
outside the workspace (links) are never listed nor used. Messages name paths relative to the workspace.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from PIL import Image

from sdtune.data.dataset import IMAGE_EXTS
from sdtune.data.intake import DEFAULT_MAX_PIXELS, UnusableImage, header_size
from sdtune.formats.reader import FormatError, check_safetensors
from sdtune.inspect import inspect_file

MiB = 2**20
MAX_IMAGE_BYTES = 20 * MiB
MAX_ADAPTER_BYTES = 1024 * MiB
FOLDERS = ("library", "uploads", "runs", "samples", "merged", "class_images")
CACHE = ".cache"


class Refused(ValueError):
    """A request the UI turns down; the message is shown to the user as it is. ``files``: uploaded files refused for
    what they are (the web app deletes its own copies of them)."""

    def __init__(self, message: str, *, files: tuple[Path, ...] = ()):
        super().__init__(message)
        self.files = tuple(files)


def safe_name(text: str, default: str = "item") -> str:
    """A file-name stem made of [A-Za-z0-9._-] only (no separators, no leading dots)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip(".-")
    return name[:80] or default


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"


class Workspace:
    def __init__(self, root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root).expanduser().resolve()
        self.max_pixels = max_pixels
        self.library, self.uploads, self.runs, self.samples, self.merged, self.class_images = (
            self.root / name for name in FOLDERS)
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def private_cache(self) -> Path:
        """``.cache/`` inside the workspace, readable by this user only (0700): the web server's temp folder."""
        cache = self.root / CACHE
        cache.mkdir(mode=0o700, exist_ok=True)
        os.chmod(cache, 0o700)  # also when it existed with looser rights
        return cache

    def contains(self, path: str | Path) -> bool:
        """Does ``path`` resolve (links followed) inside the workspace?"""
        try:
            return Path(path).resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # a link loop
            return False

    def inside(self, path: str | Path, *, under: str | Path | None = None) -> Path:
        """``path`` (relative to the workspace, or absolute) resolved; Refused unless it stays inside the workspace
        (or inside its subfolder ``under``) after following links and ``..``."""
        base = self.root if under is None else (self.root / under).resolve()
        text = str(path).strip()
        if not text or "\x00" in text:
            raise Refused("empty or invalid path")
        p = Path(text).expanduser()
        resolved = (p if p.is_absolute() else base / p).resolve()
        if not resolved.is_relative_to(base):
            where = "the workspace" if under is None else f"{under}/ of the workspace"
            raise Refused(f"{self.shown(text)}: outside {where}; only files inside it can be used")
        return resolved

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def shown(self, text: str) -> str:
        """``text`` with the workspace's absolute path taken out (messages name workspace-relative paths)."""
        return re.sub(re.escape(str(self.root)) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".", str(text))

    # -------------------------------------------------------------------------------------------- library
    def adapters(self) -> list[str]:
        """Names (file names) of the adapter files in the library, sorted; links out of the library are skipped."""
        library = self.library.resolve()
        return sorted(p.name for p in self.library.glob("*.safetensors")
                      if self.contains(p) and p.resolve().parent == library and p.is_file())

    def adapter(self, name: str) -> Path:
        """The library file called ``name`` (Refused for anything else)."""
        path = self.inside(name, under="library")
        if path.parent != self.library.resolve() or path.suffix != ".safetensors" or not path.is_file():
            raise Refused(f"{name}: no such adapter in the library")
        return path

    def free_name(self, folder: Path, stem: str, suffix: str) -> Path:
        """``folder/stem.suffix``, numbered (stem-2, stem-3, …) where the name is taken."""
        stem = safe_name(stem)
        path, k = folder / f"{stem}{suffix}", 2
        while path.exists():
            path, k = folder / f"{stem}-{k}{suffix}", k + 1
        return path

    def import_adapter(self, upload: str | Path, name: str | None = None) -> Path:
        """Check an uploaded file (size, a valid safetensors header, readable as an adapter with at least one
        module) and copy it into the library. No pickle is ever read: anything but safetensors is refused by its
        header."""
        src = Path(upload)
        check_adapter_upload(src)
        try:
            info = inspect_file(src)  # reads every module
        except (FormatError, ValueError, KeyError) as e:
            raise Refused(f"{src.name}: not an adapter file sdtune can read ({self.shown(e)})", files=(src,)) from None
        if not info["modules"]:
            raise Refused(f"{src.name}: not an adapter file sdtune can read (no adapter module found among its "
                          f"tensors)", files=(src,))
        dest = self.free_name(self.library, name or src.stem, ".safetensors")
        shutil.copyfile(src, dest)
        return dest

    def check_images(self, uploads: list[str | Path]) -> list[Path]:
        """Every uploaded file checked as an image (``check_image_upload``); nothing is written."""
        if not uploads:
            raise Refused("no images uploaded")
        paths = [Path(src) for src in uploads]
        for path in paths:
            check_image_upload(path, self.max_pixels)
        return paths

    def store_images(self, images: list[Path], folder: Path) -> Path:
        """Copy checked images (``check_images``), with a .txt caption uploaded next to one, into the new folder
        ``folder`` under ``uploads/``."""
        folder.mkdir(parents=True)
        for i, src in enumerate(images):
            stem = f"{i:03d}_{safe_name(src.stem, 'image')}"
            shutil.copyfile(src, folder / f"{stem}{src.suffix.lower()}")
            caption = src.with_suffix(".txt")
            if caption.is_file() and caption.stat().st_size < 10_000:
                shutil.copyfile(caption, folder / f"{stem}.txt")
        return folder

    def image_folder(self, path: str) -> Path:
        """A folder inside the workspace that holds at least one image."""
        folder = self.inside(path)
        if not folder.is_dir():
            raise Refused(f"{path}: no such folder in the workspace")
        if not any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir()):
            raise Refused(f"{path}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
        return folder

    def image_folders(self) -> list[str]:
        """Folders inside the workspace (two levels deep) that hold images, relative to it. Entries that resolve
        outside the workspace, hidden ones and unreadable ones are skipped: one bad entry never breaks a listing."""
        out = []
        for folder in sorted([*self.root.glob("*"), *self.root.glob("*/*")]):
            rel = folder.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in ("runs", "samples"):
                continue
            try:
                if self.contains(folder) and folder.is_dir() and any(
                        p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir()):
                    out.append(str(rel))
            except OSError:  # unreadable
                continue
        return out


def check_image_upload(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refused unless ``path`` is an image file PIL can fully decode (by content, not by its name), within the size
    limit and the pixel cap; the cap is checked from the header (``intake.header_size``) before any decoding."""
    if path.suffix.lower() not in IMAGE_EXTS:
        raise Refused(f"{path.name}: not an image (accepted: {', '.join(IMAGE_EXTS)})", files=(path,))
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise Refused(f"{path.name}: {size / MiB:.1f} MiB, the limit is {MAX_IMAGE_BYTES // MiB} MiB", files=(path,))
    try:
        header_size(path, max_pixels=max_pixels)
    except UnusableImage as e:
        raise Refused(f"{path.name}: {e}", files=(path,)) from None
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()  # verify() skips the pixel data; a truncated file only fails here
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, …)
        raise Refused(f"{path.name}: not a readable image ({type(e).__name__}: {e})", files=(path,)) from None


def check_adapter_upload(path: Path) -> None:
    """Refused unless ``path`` is a .safetensors adapter file within the size limit with a valid header."""
    if path.suffix.lower() != ".safetensors":
        raise Refused(f"{path.name}: only .safetensors adapter files are accepted (pickles can run code)",
                      files=(path,))
    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise Refused(f"{path.name}: {size / MiB:.0f} MiB, the limit is {MAX_ADAPTER_BYTES // MiB} MiB", files=(path,))
    try:
        header = check_safetensors(path)
    except FormatError as e:
        raise Refused(str(e).replace(str(path), path.name), files=(path,)) from None
    if not any(k != "__metadata__" for k in header):
        raise Refused(f"{path.name}: holds no tensors", files=(path,))
