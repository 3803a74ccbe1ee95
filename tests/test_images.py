"""transfer.data.images: every mode and format to H×W×3 uint8, every bad file to BadImageError.

All images are made here, in tmp_path, so each expected pixel value is known exactly.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    import transfer  # noqa: F401
except ImportError:  # no conftest / editable install yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer.data import images
from transfer.data.images import IMAGE_EXTENSIONS, BadImageError, read_rgb, to_rgb_uint8
from transfer.errors import UserError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def assert_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature, IHDR and an empty IDAT: claims any size in ~60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def opened(path: Path, attribute: str):
    """What Pillow itself reports for the file (mode, info, n_frames), closing it again."""
    with Image.open(path) as image:
        return getattr(image, attribute)


def noise(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- modes


def test_extensions_are_lower_case_with_dot():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                                ".webp", ".ppm", ".pgm"}
    assert isinstance(IMAGE_EXTENSIONS, frozenset)


@pytest.mark.parametrize("suffix, params", [
    (".png", {}), (".bmp", {}), (".tif", {}), (".ppm", {}), (".webp", {"lossless": True}),
])
def test_lossless_rgb_formats_round_trip_exactly(tmp_path, suffix, params):
    pixels = noise()
    path = save(Image.fromarray(pixels), tmp_path / f"a{suffix}", **params)
    out = read_rgb(path)
    assert_rgb(out, 24, 32)
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_rgb_is_close(tmp_path):
    path = save(Image.new("RGB", (16, 8), (200, 30, 90)), tmp_path / "a.jpg", quality=95)
    out = read_rgb(path)
    assert_rgb(out, 8, 16)
    assert np.abs(out.astype(int) - (200, 30, 90)).max() <= 4


def test_one_bit_png(tmp_path):
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    out = read_rgb(save(image, tmp_path / "a.png"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("suffix", [".png", ".pgm", ".tif"])
def test_grey_is_replicated(tmp_path, suffix):
    grey = np.array([[0, 7, 128, 255]], dtype=np.uint8)
    out = read_rgb(save(Image.fromarray(grey), tmp_path / f"a{suffix}"))
    assert_rgb(out, 1, 4)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], grey)


def test_16_bit_png_scales_by_type_range_not_clipping(tmp_path):
    samples = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(samples), tmp_path / "a.png")
    assert opened(path, "mode") == "I;16"
    out = read_rgb(path)
    assert out[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_16_bit_big_endian_tiff_and_memory(tmp_path):
    image = Image.frombytes("I;16B", (2, 1), b"\xff\xff\x01\x00")  # 65535, 256
    assert to_rgb_uint8(image)[0, :, 0].tolist() == [255, 1]
    path = save(image, tmp_path / "a.tif")
    assert opened(path, "mode") == "I;16B"
    assert read_rgb(path)[0, :, 0].tolist() == [255, 1]


def test_16_bit_pgm_opens_as_mode_i_and_scales_the_same(tmp_path):
    path = tmp_path / "a.pgm"
    path.write_bytes(b"P5\n3 1\n65535\n" + np.array([256, 32768, 65535], ">u2").tobytes())
    assert opened(path, "mode") == "I"
    assert read_rgb(path)[0, :, 0].tolist() == [1, 128, 255]


def test_mode_i_in_memory_clips_outside_16_bits():
    image = Image.fromarray(np.array([[-5, 256, 65535, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert to_rgb_uint8(image)[0, :, 0].tolist() == [0, 1, 255, 255]


def test_float_is_read_as_zero_to_one(tmp_path):
    samples = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    path = save(Image.fromarray(samples), tmp_path / "a.tif")
    assert opened(path, "mode") == "F"
    assert read_rgb(path)[0, :, 1].tolist() == [0, 128, 255, 255, 0, 0]


def test_cmyk_jpeg_of_cyan_is_cyan(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "a.jpg", quality=95)
    out = read_rgb(path)
    assert_rgb(out, 16, 16)
    assert np.abs(out.astype(int) - (0, 255, 255)).max() <= 8


def test_cmyk_tiff_with_black_and_unusable_icc_profile(tmp_path):
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (128, 0, 0, 128))  # half cyan on half black
    out = read_rgb(save(image, tmp_path / "a.tif"))
    assert out[0].tolist() == [[255, 255, 255], [63, 127, 127]]
    image.info["icc_profile"] = b"not a profile"  # falls back to the formula, does not fail
    assert to_rgb_uint8(image)[0, 1].tolist() == [63, 127, 127]


def test_ycbcr_tiff_and_memory(tmp_path):
    ycbcr = Image.new("RGB", (4, 2), (10, 200, 30)).convert("YCbCr")
    path = save(ycbcr, tmp_path / "a.tif")
    assert opened(path, "mode") == "YCbCr"
    for out in (read_rgb(path), to_rgb_uint8(ycbcr)):
        assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 3


def test_rgba_composites_onto_white(tmp_path):
    pixels = np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = read_rgb(save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert out[0, 0].tolist() == list(WHITE)
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(abs(value - 127) <= 1 for value in out[0, 2])


def test_la_composites_onto_white(tmp_path):
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (100, 255))
    out = read_rgb(save(image, tmp_path / "a.png"))
    assert out[0].tolist() == [list(WHITE), [100, 100, 100]]


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, *BLUE])
    image.putpixel((1, 0), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_png(tmp_path):
    out = read_rgb(save(palette_image(None), tmp_path / "a.png"))
    assert out[0].tolist() == [list(RED), list(BLUE)]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_becomes_white(tmp_path, suffix):
    path = save(palette_image(0), tmp_path / f"a{suffix}", transparency=0)
    assert read_rgb(path)[0].tolist() == [list(WHITE), list(BLUE)]


def test_16_bit_grey_png_with_trns_becomes_white(tmp_path):
    samples = np.array([[1000, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(samples), tmp_path / "a.png", transparency=1000)
    assert opened(path, "info").get("transparency") == 1000
    assert read_rgb(path)[0, :, 0].tolist() == [255, 255]
    assert read_rgb(path)[0, 0].tolist() == list(WHITE)


@pytest.mark.parametrize("mode, transparent_pixel", [
    ("PA", (0, 0)), ("La", (0, 0)), ("RGBa", (0, 0, 0, 0)),
])
def test_other_alpha_modes_in_memory(mode, transparent_pixel):
    image = Image.new(mode, (1, 1), transparent_pixel)
    if mode == "PA":
        image.putpalette([*RED])
    assert to_rgb_uint8(image)[0, 0].tolist() == list(WHITE)


def test_first_frame_of_animated_gif(tmp_path):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    path = save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert opened(path, "n_frames") == 2
    assert read_rgb(path)[0, 0].tolist() == list(RED)


def test_first_page_of_multipage_tiff(tmp_path):
    pages = [Image.new("RGB", (4, 4), BLUE), Image.new("L", (8, 8), 0)]
    path = save(pages[0], tmp_path / "a.tif", save_all=True, append_images=pages[1:])
    out = read_rgb(path)
    assert_rgb(out, 4, 4)
    assert out[0, 0].tolist() == list(BLUE)


def test_exif_orientation_6_is_rotated_clockwise(tmp_path):
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)  # left half red, right half blue
    pixels[:, :16] = RED
    pixels[:, 16:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = save(Image.fromarray(pixels), tmp_path / "a.jpg", exif=exif.tobytes(), quality=95)
    out = read_rgb(path).astype(int)
    assert_rgb(out.astype(np.uint8), 32, 16)
    assert np.abs(out[4, 8] - RED).max() <= 10  # the left edge is now the top
    assert np.abs(out[28, 8] - BLUE).max() <= 10


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "P", "I;16", "CMYK"])
def test_one_by_one(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    out = read_rgb(save(Image.new(mode, (1, 1)), tmp_path / f"a{suffix}"))
    assert_rgb(out, 1, 1)


def test_non_utf8_file_name(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9-\xff.png"
    with open(name, "wb") as file:
        Image.new("RGB", (3, 2), RED).save(file, format="PNG")
    as_text = os.fsdecode(name)  # surrogateescape
    for path in (name, as_text, Path(as_text)):
        assert read_rgb(path)[1, 2].tolist() == list(RED)


# ----------------------------------------------------------------------------- bad files


def reason_of(path, **kwargs) -> str:
    with pytest.raises(BadImageError) as caught:
        read_rgb(path, **kwargs)
    assert caught.value.path == path
    return caught.value.reason


def test_bad_image_error_is_a_user_error_and_pickles():
    error = BadImageError(b"/x/caf\xe9.jpg", "truncated file")
    assert isinstance(error, UserError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason) == (error.path, error.reason)
    assert str(copy).encode("utf-8")  # printable despite the non-UTF-8 name
    assert "caf\\xe9.jpg" in str(copy) and "truncated file" in str(copy)


def test_empty_file(tmp_path):
    path = tmp_path / "a.jpg"
    path.touch()
    assert reason_of(path) == "empty file"


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path, suffix):
    path = save(Image.fromarray(noise(64, 64)), tmp_path / f"a{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert reason_of(path) == "truncated file"


def test_png_cut_inside_its_header(tmp_path):
    path = save(Image.fromarray(noise()), tmp_path / "a.png")
    path.write_bytes(path.read_bytes()[:40])
    assert reason_of(path) == "corrupt or truncated header"


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    assert reason_of(path) == "not an image"


def test_eps_named_jpg_is_not_decoded(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert reason_of(path) == "not an image"


def test_symlink_loop(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    assert reason_of(tmp_path / "a.jpg") == "symlink loop"


def test_directory(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    assert reason_of(tmp_path / "folder.jpg") == "is a directory"


def test_missing_and_dangling(tmp_path):
    assert reason_of(tmp_path / "nothing.png") == "no such file"
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nothing.png")
    assert reason_of(tmp_path / "dangling.png") == "no such file"


def test_fifo_does_not_block(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    assert reason_of(path) == "not a regular file"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = save(Image.new("RGB", (2, 2)), tmp_path / "a.png")
    path.chmod(0)
    assert reason_of(path) == "permission denied"


def test_permission_error_from_open(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (2, 2)), tmp_path / "a.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert reason_of(path) == "permission denied"


@pytest.mark.parametrize("suffix, params", [
    (".jpg", {}), (".png", {}), (".gif", {}), (".bmp", {}), (".tif", {}),
    (".webp", {}), (".ppm", {}),
])
def test_any_cut_or_flipped_byte_is_an_image_or_bad_image_error(tmp_path, suffix, params):
    good = save(Image.fromarray(noise(16, 16)), tmp_path / f"good{suffix}", **params).read_bytes()
    rng = np.random.default_rng(1)
    variants = [good[:cut] for cut in range(1, len(good), max(1, len(good) // 40))]
    for position in rng.integers(0, len(good), 40):
        damaged = bytearray(good)
        damaged[position] ^= 0xFF
        variants.append(bytes(damaged))
    path = tmp_path / f"bad{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF in damaged TIFFs
        for data in variants:
            path.write_bytes(data)
            try:
                out = read_rgb(path)
            except BadImageError as error:
                assert error.reason
            else:
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


# ----------------------------------------------------------------------------- bombs


def test_header_claiming_100000_squared_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    start = time.perf_counter()
    reason = reason_of(path)
    assert time.perf_counter() - start < 1.0
    assert reason.startswith("decompression bomb")


def test_bomb_between_pillow_warning_and_error_is_ours_and_silent(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(10_000, 10_000))  # 1e8: above the limit, below 2x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = reason_of(path)
    assert reason == "decompression bomb (10000×10000 pixels > 89,478,485 allowed)"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_small_max_pixels_refuses_a_normal_image(tmp_path):
    path = save(Image.fromarray(noise(64, 64)), tmp_path / "a.png")
    assert reason_of(path, max_pixels=1000) == "decompression bomb (64×64 pixels > 1,000 allowed)"
    assert_rgb(read_rgb(path, max_pixels=64 * 64), 64, 64)


def test_zero_sized_header(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(png_header_only(0, 5))
    with pytest.raises(BadImageError):
        read_rgb(path)
