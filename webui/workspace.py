"""The web UI's file rules: every path lives inside one workspace folder, uploads are checked before they are kept.

Layout (created on first use):
    library/     adapter files (*.safetensors): trained results, blends, imports
    uploads/     instance images uploaded for training, one folder per upload
    runs/        training run folders (``sdtune.train`` output)
    samples/     generated images, one folder per request
    merged/      merged checkpoints
    class_images/ prior-preservation caches
Any other folder inside the workspace can hold instance images (``folder`` on the Train tab).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from PIL import Image

from sdtune.formats.reader import FormatError, check_safetensors
from sdtune.inspect import inspect_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_ADAPTER_BYTES = 1024 * 1024 * 1024
FOLDERS = ("library", "uploads", "runs", "samples", "merged", "class_images")


class Refused(ValueError):
    """A request the UI turns down; the message is shown to the user as it is."""


def safe_name(text: str, default: str = "item") -> str:
    """A file-name stem made of [A-Za-z0-9._-] only (no separators, no leading dots)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip(".-")
    return name[:80] or default


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.library, self.uploads, self.runs, self.samples, self.merged, self.class_images = (
            self.root / name for name in FOLDERS)
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

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
            raise Refused(f"{text}: outside {where} ({base}); only files inside it can be used")
        return resolved

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    # -------------------------------------------------------------------------------------------- library
    def adapters(self) -> list[str]:
        """Names (file names) of the adapter files in the library, sorted."""
        return sorted(p.name for p in self.library.glob("*.safetensors") if p.is_file())

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
        """Check an uploaded file (size, a valid safetensors header, readable as an adapter) and copy it into the
        library. No pickle is ever read: anything but safetensors is refused by its header."""
        src = Path(upload)
        check_adapter_upload(src)
        try:
            inspect_file(src)  # reads every module: a safetensors file that is no adapter is refused here
        except (FormatError, ValueError, KeyError) as e:
            raise Refused(f"{src.name}: not an adapter file sdtune can read ({e})") from None
        dest = self.free_name(self.library, name or src.stem, ".safetensors")
        shutil.copyfile(src, dest)
        return dest

    def store_images(self, uploads: list[str | Path]) -> Path:
        """Check every uploaded file is an image (PIL decodes it) and copy them into a new ``uploads/`` folder;
        nothing is kept if any file is refused."""
        if not uploads:
            raise Refused("no images uploaded")
        for src in uploads:
            check_image_upload(Path(src))
        folder = self.uploads / stamp()
        folder.mkdir(parents=True)
        for i, src in enumerate(uploads):
            src = Path(src)
            shutil.copyfile(src, folder / f"{i:03d}_{safe_name(src.stem, 'image')}{src.suffix.lower()}")
            caption = src.with_suffix(".txt")
            if caption.is_file() and caption.stat().st_size < 10_000:  # a caption uploaded next to it
                shutil.copyfile(caption, folder / f"{i:03d}_{safe_name(src.stem, 'image')}.txt")
        return folder

    def image_folder(self, path: str) -> Path:
        """A folder inside the workspace that holds at least one image."""
        folder = self.inside(path)
        if not folder.is_dir():
            raise Refused(f"{path}: no such folder in the workspace")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            raise Refused(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return folder

    def image_folders(self) -> list[str]:
        """Folders inside the workspace (two levels deep) that hold images, relative to it."""
        out = []
        for folder in sorted(p for p in [*self.root.glob("*"), *self.root.glob("*/*")] if p.is_dir()):
            if folder.name.startswith(".") or folder.is_relative_to(self.runs) or folder.is_relative_to(self.samples):
                continue
            if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
                out.append(self.relative(folder))
        return out


def check_image_upload(path: Path) -> None:
    """Refused unless ``path`` is an image file PIL can fully decode (by content, not by its name)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise Refused(f"{path.name}: not an image (accepted: {', '.join(IMAGE_SUFFIXES)})")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise Refused(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()  # verify() skips the pixel data; a truncated file only fails here
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBombError, …)
        raise Refused(f"{path.name}: not a readable image ({type(e).__name__}: {e})") from None


def check_adapter_upload(path: Path) -> None:
    """Refused unless ``path`` is a .safetensors adapter file within the size limit with a valid header."""
    if path.suffix.lower() != ".safetensors":
        raise Refused(f"{path.name}: only .safetensors adapter files are accepted (pickles can run code)")
    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise Refused(f"{path.name}: {size / 1e6:.0f} MB, the limit is {MAX_ADAPTER_BYTES / 1e6:.0f} MB")
    try:
        header = check_safetensors(path)
    except FormatError as e:
        raise Refused(str(e).replace(str(path), path.name)) from None
    if not any(k != "__metadata__" for k in header):
        raise Refused(f"{path.name}: holds no tensors")
