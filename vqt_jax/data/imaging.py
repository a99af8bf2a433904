"""Image decoding (PIL) and bilinear resizing (numpy), without TensorFlow.

`decode` reads every format of an image folder (PNG, JPEG, BMP, GIF: its first frame, WebP)
to uint8 RGB as TensorFlow's ``tf.io.decode_image(..., channels=3, expand_animations=False)``
did. JPEG: TensorFlow decodes with libjpeg's fast integer IDCT and smooth ("fancy") chroma
upsampling. PIL offers the fast IDCT only together with plain upsampling, so a JPEG without
chroma subsampling (gray, 4:4:4, CMYK) decodes with it, to TensorFlow's pixels exactly, and a
subsampled one (4:2:0, 4:2:2) with PIL's accurate IDCT and smooth upsampling: TensorFlow's
upsampling, and an IDCT that rounds a few levels differently on some pixels. CMYK becomes RGB
by TensorFlow's formula, and an EXIF orientation is ignored, as TensorFlow does
(docs/caching.md, "Decoding", lists the edge cases).

`resize` is ``tf.image.resize(method='bilinear')`` of TF2 (half-pixel centres, no antialias)
in float32, with TensorFlow's operation order, and its uint8 rounding (half to even).

`IMPLEMENTATION` names this decoder and resize; caches of preprocessed images carry it in their
key (`content.py`), so a cache made by another implementation is never reused silently.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

IMPLEMENTATION = "pil-decode+numpy-bilinear-2"  # -2: CMYK and MPO JPEGs as TF decodes them.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Signatures, to name the format of a file that PIL cannot even open.
_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP"}


class DecodeError(ValueError):
    """An image that does not decode; the message is the decoder's reason."""


def _reason(error: Exception, fmt: str | None) -> str:
    """'Invalid PNG data: image file is truncated': the format and PIL's words, without its
    parenthesised details (byte counts, object reprs)."""
    message = re.sub(r"\s*(\([^)]*\)|<[^>]*>|'<[^>]*>')", "", str(error)).strip().rstrip(".")
    return f"Invalid {fmt or 'image'} data: {message or type(error).__name__}"


def decode(encoded: bytes, channels: int = 3) -> np.ndarray:
    """Decodes an encoded image to uint8 ``[H, W, channels]`` (`channels` 3: RGB, 1: gray).

    Alpha and transparency are dropped, palettes expanded, gray replicated to RGB; 16-bit
    images keep their high byte; EXIF orientation is ignored. An animated GIF or WebP gives
    its first frame.

    Raises:
        DecodeError: The data is not a complete image of a format PIL reads.
    """
    fmt = next((name for magic, name in _MAGIC.items() if encoded.startswith(magic)), None)
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if (image.format in ("JPEG", "MPO")  # MPO: a camera's JPEG holding more images.
                    and len({layer[1:3] for layer in image.layer}) == 1):
                # No chroma subsampling: libjpeg's fast integer IDCT, as TF; (scale, draft).
                image.decoderconfig = (1, 1)
            if image.mode.startswith("I;16"):
                gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)[..., None]
                return np.repeat(gray, channels, axis=-1)
            if image.mode == "CMYK":  # TF's conversion: it floors, PIL's rounds.
                ink = 255 - np.asarray(image).astype(np.uint16)
                image = Image.fromarray((ink[..., :3] * ink[..., 3:] // 255).astype(np.uint8))
            image.info.pop("transparency", None)  # Alpha is dropped: no PIL warning about it.
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file does not decode.
        raise DecodeError(_reason(e, fmt)) from e
    return pixels.reshape(*pixels.shape[:2], channels)


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's bilinear taps: lower and upper source index and the float32 weight."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(source)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    return lower, upper, (source - floor).astype(np.float32)


def resize(image: np.ndarray, image_size: int, round_resized: bool = True) -> np.ndarray:
    """Bilinear resize of an image ``[H, W, C]`` (or a batch ``[N, H, W, C]``, each image
    alike, as `tf.image.resize` takes both) to ``[image_size, image_size, C]``, no crop.

    With `round_resized` the result is rounded (half to even) and clipped back to uint8 (a
    quarter of the memory for the in-memory training set); otherwise it is the float32 result
    as is, as the VQT release feeds it. Training, caching and evaluation all go through this
    function, so they see identical pixels.
    """
    image = np.asarray(image)
    if image.ndim == 4:
        return np.stack([resize(x, image_size, round_resized) for x in image])
    (height, width, channels), size = image.shape, image_size
    top, bottom, y_weight = _taps(height, size)
    left, right, x_weight = _taps(width, size)
    x_weight = np.repeat(x_weight, channels)

    def lerp(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray) -> np.ndarray:
        hi -= lo  # lo + (hi - lo) * weight, in place: TF's float32 operations.
        hi *= weight
        hi += lo
        return hi

    def row(y: np.ndarray) -> np.ndarray:  # Rows y, interpolated along x as TF does.
        rows = image[y].reshape(size, width * channels)
        lo, hi = (np.take(rows, (x[:, None] * channels + np.arange(channels)).ravel(), axis=1)
                  .astype(np.float32) for x in (left, right))
        return lerp(lo, hi, x_weight)

    out = lerp(row(top), row(bottom), y_weight[:, None]).reshape(size, size, channels)
    return np.clip(np.round(out), 0, 255).astype(np.uint8) if round_resized else out
