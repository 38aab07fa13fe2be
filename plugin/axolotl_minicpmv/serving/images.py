"""Pictures of a request: `data:` URLs always, file paths only inside `--image-root`, http(s) never.

Every picture is opened from bytes (never from a string `load_image` could take for a path): `open_image` reads
its header and checks its pixel count, `decode_image` decodes it, so a request can neither read a file outside
the root nor make the server decode a huge image (the API also checks the prompt's length from the headers
before decoding any picture).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

from PIL import Image

from ..model.image_processing_minicpmv import load_image
from .protocol import RequestError

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def open_image(url: str, param: str, image_root: Path | None, max_pixels: int) -> Image.Image:
    """The picture that `url` (an `image_url.url`) names, its header read and its size checked (not yet decoded:
    `decode_image`), or a RequestError naming `param` and why."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param} must be a non-empty string (a data: URL)", param)
    lowered = url[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise RequestError(
            f"{param}: http(s) image URLs are not fetched by this server; send the image inline as a data: URL (data:image/png;base64,...)",
            param,
            code="unsupported_image_url",
        )
    if lowered.startswith("data:"):
        data = _data_url_bytes(url, param)
    elif lowered.startswith("file://") or "://" not in url[:16]:
        data = _file_bytes(url[len("file://") :] if lowered.startswith("file://") else url, param, image_root)
    else:
        raise RequestError(
            f"{param}: unsupported URL scheme {url.split(':', 1)[0]!r}; send a data: URL", param, code="unsupported_image_url"
        )
    return _open(data, param, max_pixels)


def _data_url_bytes(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise RequestError(f"{param}: a data: URL needs a ',' before its data (data:image/png;base64,...)", param)
    if not header.lower().endswith(";base64"):
        raise RequestError(f"{param}: only base64 data: URLs are accepted (data:image/...;base64,...)", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{param}: the data: URL's payload is not valid base64 ({err})", param) from None


def _file_bytes(path: str, param: str, image_root: Path | None) -> bytes:
    if image_root is None:
        raise RequestError(
            f"{param}: file paths are refused (the server runs without --image-root); send a data: URL", param, code="image_path_refused"
        )
    refused = RequestError(
        f"{param}: the path is outside --image-root or not a file; only files inside it are served", param, code="image_path_refused"
    )
    # A path that points outside the root as written ('..', absolute) is refused before the file system is asked,
    # so the answer does not tell whether it exists; links are resolved next, and the result must lie inside too.
    if not Path(os.path.normpath(image_root / path)).is_relative_to(image_root):
        raise refused
    try:
        target = (image_root / path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise RequestError(f"{param}: no such file under --image-root", param, code="image_not_found") from None
    if not target.is_relative_to(image_root) or not target.is_file():
        raise refused
    return target.read_bytes()


# Pillow's format plugins fail on malformed data with many exception types (OSError, SyntaxError, ValueError,
# IndexError, struct.error, EOFError...): any of them means the client sent a picture that cannot be read.
def _invalid(param: str, err: Exception) -> RequestError:
    return RequestError(f"{param}: cannot decode the image ({type(err).__name__}: {err})", param, code="invalid_image")


def _open(data: bytes, param: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as err:
        raise _invalid(param, err) from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            f"{param}: the image is {width}x{height} = {width * height:,} pixels, more than the server's "
            f"--max-image-pixels {max_pixels:,}; send a smaller image",
            param,
            code="image_too_large",
        )
    return image


def decode_image(image: Image.Image, param: str) -> Image.Image:
    """The RGB pixels of a picture from `open_image`, or a RequestError naming `param`."""
    try:
        image.load()
        return load_image(image, what=param)
    except Exception as err:
        raise _invalid(param, err) from None
