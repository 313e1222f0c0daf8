"""Reading image and mask files: the one place aaclip opens them (training, test, validation,
predict and the exported-file scorer all read through here).

Images are read as the reference AA-CLIP code reads them, ``Image.open(path).convert("RGB")``, and
masks as greyscale, ``convert("L")``, which the callers binarise with ``!= 0``. So every mode PIL
opens is accepted and becomes what PIL's conversion makes of it: palette and 1-bit images are
expanded, the alpha of RGBA / LA / PA images is dropped (not composited), CMYK is converted
without a colour profile, 16- and 32-bit greyscale (``I;16``, ``I``) is clipped to 0..255 (not
scaled), and the EXIF orientation tag is ignored (the pixels are read as stored, like the
reference, and a mask stays aligned with its image).

Every way a file can fail to read becomes one `UnreadableImage` (a `DataError`) naming the file:
PIL raises OSError for a missing, unidentified or truncated file, SyntaxError or ValueError for
corrupt chunks and unconvertible modes, and ``Image.DecompressionBombError`` (not an OSError) when
the header declares more pixels than PIL agrees to decode.

Imports only PIL and the standard library, so the scorer (`aaclip_score`) uses it without torch;
`aaclip_score.images` imports it from here.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from aaclip_score.errors import DataError

READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImage(DataError):
    """An image or mask file PIL cannot read; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} cannot be read ({reason}).")
        self.path = Path(path)
        self.reason = reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels"
        cap = f"{limit:,}" if limit else "the limit"
        return (
            f"its header declares {size}, more than the {cap} PIL agrees to decode (a guard against "
            "decompression bombs); downscale it or split it into tiles"
        )
    if isinstance(exc, FileNotFoundError):
        return "the file does not exist"
    text = str(exc).strip() or type(exc).__name__
    return text.rstrip(".")


def _fail(path: Path, exc: BaseException) -> UnreadableImage:
    return UnreadableImage(path, _reason(exc))


def _read(path: Path, mode: str, source=None) -> Image.Image:
    """``source`` (a file object) is read in place of ``path``, which then only names it."""
    try:
        with Image.open(path if source is None else source) as image:
            return image.convert(mode)
    except READ_ERRORS as exc:
        raise _fail(path, exc) from exc


def read_rgb(path: Path) -> Image.Image:
    """The decoded image as 8-bit RGB, exactly ``Image.open(path).convert("RGB")``."""
    return _read(path, "RGB")


def read_rgb_bytes(data: bytes, name: str) -> Image.Image:
    """`read_rgb` of an encoded image held in memory; ``name`` is how an error names it."""
    return _read(Path(name), "RGB", io.BytesIO(bytes(data)))


def read_grey(path: Path) -> Image.Image:
    """The decoded mask as 8-bit greyscale, exactly ``Image.open(path).convert("L")``."""
    return _read(path, "L")


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, after PIL's structural check (``verify``), without decoding."""
    # verify() leaves the image unusable, so the size is read from the same handle before it.
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except READ_ERRORS as exc:
        raise _fail(path, exc) from exc
    return size
