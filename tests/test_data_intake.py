"""Photos as they come (issue 16, point 5): one instance folder that mixes every case a user's folder holds.

EXIF orientation, 16-bit grey, palette with transparency, CMYK, RGBA on a configurable background, a
decompression bomb, an image over the pixel cap, symlinks out of and inside the folder, a sub-folder, an
unsupported extension, a caption with BOM and CRLF, a truncated file and an image without a caption: the usable
ones decode as displayed, the unusable ones end in ONE DataError naming each, never a traceback.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.data.dataset import DataError, DreamBoothDataset, scan_instance_dir
from sdtune.data.intake import UnusableImage, decode, header_size, probe

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w × h pixels (no image data: the header is all a bomb needs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _exif6(path: Path) -> None:
    """Stored 80×48 with a red top-left corner and EXIF orientation 6 (a phone's portrait shot): shown 48×80."""
    im = Image.new("RGB", (80, 48), (0, 0, 255))
    im.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)


def _mixed_folder(root: Path) -> Path:
    inst = root / "inst"
    (inst / "sub").mkdir(parents=True)
    _exif6(inst / "phone.jpg")
    grey16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(grey16).save(inst / "grey16.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([*RED, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 32, 64))
    pal.save(inst / "palette.png", transparency=0)
    Image.new("RGB", (64, 64), (200, 30, 40)).convert("CMYK").save(inst / "cmyk.jpg", quality=95)
    rgba = Image.new("RGBA", (64, 64), (*RED, 0))  # fully transparent red: must not train as red
    rgba.paste((0, 0, 255, 255), (16, 16, 48, 48))
    rgba.save(inst / "cutout.png")
    _png_header_only(inst / "bomb.png", 100_000, 100_000)
    Image.new("RGB", (400, 400)).save(inst / "huge.png")  # over the test's 100,000-pixel cap
    outside = root / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    (inst / "link_out.png").symlink_to(outside)
    (inst / "link_in.png").symlink_to(inst / "cmyk.jpg")
    (inst / "passwd.png").symlink_to("/etc/passwd")
    Image.new("RGB", (64, 64)).save(inst / "sub" / "nested.png")
    Image.new("RGB", (64, 64)).save(inst / "anim.gif")
    (inst / "broken.png").write_bytes((inst / "cmyk.jpg").read_bytes()[:200])
    Image.new("RGB", (64, 64)).save(inst / "uncaptioned.png")
    for p in inst.rglob("*"):
        if p.suffix in (".png", ".jpg") and p.stem not in ("uncaptioned",):
            p.with_suffix(".txt").write_text("a sks star\n")
    (inst / "phone.txt").write_bytes("\ufeffa sks star\r\n  on  grass \r\n".encode())
    return inst


USABLE = {"phone.jpg", "grey16.png", "palette.png", "cmyk.jpg", "cutout.png", "link_in.png"}
UNUSABLE = {"bomb.png": "too many pixels", "huge.png": "over the cap", "link_out.png": "outside the folder",
            "passwd.png": "outside the folder", "broken.png": "corrupt", "uncaptioned.png": "no caption"}


def test_every_unusable_file_is_named_in_one_message_and_warnings_list_the_rest(tmp_path):
    inst = _mixed_folder(tmp_path)
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(DataError) as err:
            scan_instance_dir(inst, 32, prompt=None, max_pixels=100_000)
    message = str(err.value)
    assert f"{len(UNUSABLE)} of {len(USABLE) + len(UNUSABLE)} image(s)" in message
    for name, why in UNUSABLE.items():
        line = next(line for line in message.splitlines() if line.strip().startswith(name + ":"))
        assert why in line, line
    for name in USABLE:
        assert name + ":" not in message
    warned = "\n".join(str(w.message) for w in caught)
    assert "unsupported extensions" in warned and "anim.gif" in warned
    assert "sub-folder(s) not read" in warned and "sub" in warned and "data.recursive" in warned


def test_skipping_bad_files_keeps_the_usable_ones_and_recursion_finds_sub_folders(tmp_path):
    inst = _mixed_folder(tmp_path)
    with pytest.warns(UserWarning) as caught:
        found = scan_instance_dir(inst, 32, prompt="a photo", max_pixels=100_000, skip_bad=True, recursive=True)
    skipped = [str(w.message).split(" in ")[0] for w in caught if str(w.message).startswith("skipping")]
    assert skipped == ["skipping 5 image(s)"]
    names = {str(Path(e.path).relative_to(inst)) for e in found}
    assert names == USABLE | {"uncaptioned.png", "sub/nested.png"}  # the folder prompt captions uncaptioned.png
    by = {Path(e.path).name: e for e in found}
    assert by["phone.jpg"].caption == "a sks star on grass"  # BOM, CRLF and whitespace removed
    assert by["uncaptioned.png"].caption == "a photo"
    assert by["phone.jpg"].size == (48, 80)  # EXIF 6: displayed portrait


def test_decoding_shows_the_image_as_displayed(tmp_path):
    inst = _mixed_folder(tmp_path)
    phone, _ = decode(inst / "phone.jpg")
    a = np.asarray(phone)
    assert phone.size == (48, 80)
    assert a[2, -3, 0] > 200 and a[2, -3, 2] < 60  # stored top-left (red) is shown top-right after orientation 6
    assert a[-3, 2, 2] > 200                           # the rest stays blue

    grey, _ = decode(inst / "grey16.png")
    g = np.asarray(grey)[..., 0].astype(float)
    assert Image.open(inst / "grey16.png").mode.startswith("I")
    assert abs(g.mean() - 127.5) < 2 and g.min() == 0 and g.max() == 255  # scaled, not clipped to white
    assert (g == 255).mean() < 0.01

    pal, alpha = decode(inst / "palette.png", background=GREEN)
    p = np.asarray(pal)
    assert tuple(p[0, 0]) == (0, 0, 255) and tuple(p[0, -1]) == GREEN  # transparent palette entry -> background
    assert np.asarray(alpha)[0, -1] == 0 and np.asarray(alpha)[0, 0] == 255

    cmyk, _ = decode(inst / "cmyk.jpg")
    assert np.abs(np.asarray(cmyk)[32, 32].astype(int) - (200, 30, 40)).max() < 12

    for bg in (GREEN, (0, 0, 0)):
        cut, alpha = decode(inst / "cutout.png", background=bg)
        c = np.asarray(cut)
        assert tuple(c[2, 2]) == bg and tuple(c[32, 32]) == (0, 0, 255)
        assert np.asarray(alpha)[2, 2] == 0 and np.asarray(alpha)[32, 32] == 255


def test_the_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # no pixel data at all: decoding would fail
    with pytest.raises(UnusableImage, match="too many pixels"):
        header_size(tmp_path / "bomb.png")
    _png_header_only(tmp_path / "big.png", 3000, 2000)
    with pytest.raises(UnusableImage, match=r"3000×2000 is 6.0 megapixels, over the cap of 5 megapixels"):
        decode(tmp_path / "big.png", max_pixels=5_000_000)
    assert header_size(tmp_path / "big.png") == (3000, 2000)  # under the default cap: the header alone answers
    assert probe(tmp_path / "big.png").size == (3000, 2000)


def test_alpha_as_mask_reaches_the_dataset_view(tmp_path):
    inst = _mixed_folder(tmp_path)
    with pytest.warns(UserWarning) as caught:
        found = scan_instance_dir(inst, 32, prompt="x", max_pixels=100_000, skip_bad=True, alpha_mask=True)
    assert any(str(w.message).startswith("skipping") for w in caught)
    (found,) = [e for e in found if e.path.endswith("cutout.png")]
    assert found.mask == "alpha"
    ds = DreamBoothDataset([found], None, resolution=64, background=GREEN)
    x, m = ds.pixels(found, False, None)
    assert x.shape == (3, 64, 64) and m.shape == (1, 64, 64)
    assert float(m[0, 2, 2]) == 0 and float(m[0, 32, 32]) == 1
    assert x[:, 2, 2].tolist() == [-1.0, 1.0, -1.0]  # composited on green, in [-1, 1]
