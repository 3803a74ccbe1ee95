"""Turning any image file into an RGB uint8 array: the only place in transfer that decodes images.

Every dataset goes through :func:`read_rgb` (files) or :func:`to_rgb_uint8` (in-memory images), so a
16-bit PNG, a CMYK JPEG or a transparent logo looks the same to the model whichever dataset loaded
it, and a broken file always surfaces as one exception type, :class:`BadImageError`, that a loader
can count, skip or report.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from transfer.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# The Pillow decoders behind IMAGE_EXTENSIONS (multi-picture JPEGs come through "JPEG" too). Other
# decoders are never tried, so a stray EPS renamed to .jpg cannot make Pillow run Ghostscript.
_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

# Leading bytes of those formats: a file that starts like one but will not open is damaged, not
# "not an image", and the user deserves to know which.
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
)

_WHITE = (255, 255, 255)
_OPEN_ERRORS = {
    errno.ENOENT: "no such file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "symlink loop",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "I/O error while reading",
}


class BadImageError(UserError):
    """A file that cannot be turned into an image; ``reason`` says why in a few words.

    A ``UserError`` because the fix is the user's (re-save or remove the file); ``path`` is kept as
    given (str, bytes or PathLike) so a loader can match it against its own file list.
    """

    def __init__(self, path: str | bytes | os.PathLike, reason: str) -> None:
        # Both go to args so the exception pickles, i.e. survives a DataLoader worker boundary.
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read image {_printable(self.path)}: {self.reason}; fix or remove this file"


def read_rgb(path: str | bytes | os.PathLike, max_pixels: int = 89_478_485, min_side: int | None = None) -> np.ndarray:
    """Decode an image file into an H×W×3 uint8 C-contiguous (writable) array.

    The first frame of an animation or multi-page TIFF is used; EXIF orientation is applied, so the
    array is what a photo viewer shows. ``max_pixels`` (default: Pillow's own limit) is checked
    against the header before any pixel is decoded, so a tiny file claiming 100000×100000 pixels
    costs nothing. Pillow's hard limit (twice ``Image.MAX_IMAGE_PIXELS``) still applies above it.
    A truncated file is an error, never silently padded with grey: a half-grey photo is a wrong
    training sample. Any problem with the file raises :class:`BadImageError`.

    ``min_side``: the caller shrinks the image to this shorter side anyway, so a JPEG may be decoded at 1/2,
    1/4 or 1/8 scale (libjpeg's reduce-on-decode, Pillow's ``draft``), the smallest whose sides all stay at
    least ``min_side``: a 4000×3000 photo needed at 448 px decodes at 1000×750, several times faster. The
    pixels differ slightly from a full decode shrunk the same way, so only training images use it
    (evaluation keeps timm's exact pixels); None or a file less than twice ``min_side`` decodes in full.
    """
    _check_is_regular_file(path)
    try:
        with open(path, "rb") as file:
            image = _decode(path, file, max_pixels, min_side)
    except OSError as error:  # from open() itself; decode errors are already BadImageError
        raise BadImageError(path, _os_reason(error)) from error
    try:
        return to_rgb_uint8(image)
    except ValueError as error:
        raise BadImageError(path, f"unsupported colour mode {image.mode!r}") from error


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert an in-memory image by the same rules as :func:`read_rgb` (files go through here too).

    High bit depths are scaled by the range of their type (16-bit: the top 8 bits) instead of being
    clipped at 255 as Pillow's ``convert`` does, which would turn most 16-bit images white.
    Transparent pixels become white (see :func:`_composite_on_white`). CMYK goes through its
    embedded ICC profile when there is one: print profiles differ a lot from the naive formula.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _gray_to_rgb(_sixteen_bit_to_uint8(image))
    if image.mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(image)))
    if image.has_transparency_data:
        image = _composite_on_white(image)
    elif image.mode == "CMYK":
        image = _cmyk_to_rgb(image)
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a copy: np.asarray would be read-only


def _check_is_regular_file(path: str | bytes | os.PathLike) -> None:
    """Refuse what open() would choke or hang on (a directory, a FIFO) and empty files, by stat."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise BadImageError(path, _os_reason(error)) from error
    except ValueError as error:  # e.g. a NUL byte in the name
        raise BadImageError(path, f"invalid file name ({error})") from error
    if stat.S_ISDIR(info.st_mode):
        raise BadImageError(path, "is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError(path, "not a regular file")
    if info.st_size == 0:
        raise BadImageError(path, "empty file")


def _decode(
    path: str | bytes | os.PathLike, file: io.BufferedReader, max_pixels: int, min_side: int | None = None
) -> Image.Image:
    """Open, size-check, load and orient; every decoder failure becomes a BadImageError.

    Pillow raises many types for damaged files (OSError, ValueError, SyntaxError, struct.error,
    EOFError, ...), so everything but MemoryError is caught here, around Pillow calls only.
    The DecompressionBombWarning is silenced because the ``max_pixels`` check replaces it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file, formats=_FORMATS)
            _check_size(path, image.size, max_pixels)
            if min_side and image.format == "JPEG":  # the same mode; only the scale (see read_rgb)
                image.draft(image.mode, (min_side, min_side))
            image.load()
    except (BadImageError, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        raise BadImageError(path, _bomb_reason(str(error))) from error
    except UnidentifiedImageError as error:
        raise BadImageError(path, _unidentified_reason(file)) from error
    except Exception as error:  # noqa: BLE001 - see docstring
        raise BadImageError(path, _decode_reason(error)) from error
    _apply_exif_orientation(image)
    return image


def _check_size(path: str | bytes | os.PathLike, size: tuple[int, int], max_pixels: int) -> None:
    """Compare the header's size to the limit before load() allocates anything."""
    width, height = size
    if width * height > max_pixels:
        raise BadImageError(
            path, f"decompression bomb ({width}×{height} pixels > {max_pixels:,} allowed)"
        )
    if width == 0 or height == 0:
        raise BadImageError(path, f"zero-sized image ({width}×{height})")


def _apply_exif_orientation(image: Image.Image) -> None:
    """Rotate in place as the EXIF tag says; unreadable EXIF leaves the pixels as stored.

    Junk EXIF is common in camera and phone files whose pixels are fine; losing the sample would
    be worse than an unrotated one (which is also what a reader ignoring EXIF would give).
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - malformed EXIF comes as many types
        pass


def _sixteen_bit_to_uint8(image: Image.Image) -> np.ndarray:
    """Keep the top byte of 16-bit samples (65535 → 255, 256 → 1).

    Mode "I" is 32-bit storage, but in files it holds 16-bit samples (16-bit PGM opens as "I"),
    so it gets the same scale; values outside 0..65535 are clipped. A 16-bit PNG's tRNS value
    becomes white, as for 8-bit transparency.
    """
    samples = np.asarray(image)
    gray = (np.clip(samples, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        gray[samples == transparent] = 255
    return gray


def _float_to_uint8(samples: np.ndarray) -> np.ndarray:
    """Read float samples as 0..1 (numpy/torch convention), not as Pillow's 0..255; NaN → 0."""
    scaled = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=0.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, np.newaxis], 3, axis=2))


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white.

    A transparent background means "no object there"; white is what viewers, browsers and
    document tools show behind it, so it is what the labeller saw. Keeping the stored colour
    instead exposes whatever the encoder left under alpha 0 (often black), which is noise.
    """
    if image.mode == "La":
        image = image.convert("LA")  # Pillow cannot go from premultiplied La to RGBA directly
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, _WHITE)
    flat.paste(rgba, mask=rgba)
    return flat


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when it works; Pillow's (255-C)(255-K) formula otherwise."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass
    return image.convert("RGB")


def _os_reason(error: OSError) -> str:
    return _OPEN_ERRORS.get(error.errno, f"cannot open ({error.strerror or error})")


def _bomb_reason(message: str) -> str:
    """Pillow's own refusal names only the pixel count; pass that on in our wording."""
    match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", message)
    if match is None:
        return "decompression bomb"
    pixels, limit = (int(group) for group in match.groups())
    return f"decompression bomb ({pixels:,} pixels > Pillow's limit {limit:,})"


def _unidentified_reason(file: io.BufferedReader) -> str:
    file.seek(0)
    head = file.read(16)
    is_webp = head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    if is_webp or head.startswith(_SIGNATURES):
        return "corrupt or truncated header"
    return "not an image"


def _decode_reason(error: Exception) -> str:
    message = str(error)
    if "truncated" in message.lower():
        return "truncated file"
    if isinstance(error, OSError) and error.errno in _OPEN_ERRORS:
        return _OPEN_ERRORS[error.errno]
    return f"corrupt image data ({type(error).__name__}: {message})"


def _printable(path: str | bytes | os.PathLike) -> str:
    """The path as text that any terminal can print, even when the name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
