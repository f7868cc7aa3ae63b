"""Image decoding for the loader's workers: bytes in, an upright uint8 (H, W, C) array out.

Pillow decodes (libjpeg-turbo inside). For JPEGs, ``Image.draft`` asks libjpeg to scale by
1/2, 1/4 or 1/8 in the DCT domain while keeping both sides at least ``min_side``: a large
photo costs a fraction of a full decode, and an image already near the training resolution
is decoded in full. EXIF orientation is applied, so a photo taken sideways is upright (the
shard writer stores such JPEGs rotated, and both paths give the same pixels).

Everything here is deterministic: decoding never draws random numbers.
"""
from __future__ import annotations

import io

import numpy as np

_EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
    """An image that cannot be decoded (the message names the file and the cause)."""


def decode_image(buf: bytes, *, channels: int = 3, min_side: int | None = None, name: str = "<bytes>") -> np.ndarray:
    """Decode an encoded image into a C-contiguous ``(H, W, channels)`` uint8 array.

    Args:
        buf: the encoded file (JPEG, PNG, WebP, ... anything Pillow reads).
        channels: 3 (RGB; grey, palette, CMYK and alpha images are converted) or 1 (luminance).
        min_side: for JPEGs, let the decoder downscale in the DCT domain (1/2, 1/4, 1/8) as far
            as both sides stay >= ``min_side``; ``None`` decodes at full size.
        name: the file's name, for the error message.

    Raises:
        DecodeError: unreadable, truncated or empty data, naming ``name``.
    """
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ValueError(f"decode_image: channels expected 1 or 3, got {channels}")
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(io.BytesIO(buf)) as im:
            if min_side and im.format == "JPEG":
                im.draft(mode, (int(min_side), int(min_side)))
            im.load()
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            if im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DecodeError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DecodeError(f"cannot decode image {name}: it has size {arr.shape[1]}x{arr.shape[0]}")
    return np.ascontiguousarray(arr)
