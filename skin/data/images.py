"""Image primitives shared by staging, training and serving.

:func:`prepare_image` checks one file's bytes and turns them into what stage stores (an
RGB JPEG, big images downscaled, a thumbnail for near-duplicate grouping); raising
:class:`UnusableImage` with the reason. :func:`skin.data.dataset.load_images` runs the same
function, so a served image is exactly what training saw. :func:`find_images` and
:func:`file_number` read folders and file names. No TensorFlow at import.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_SIDE = 8000  # larger sides are quarantined (no dermoscope produces them; likely a bomb)
MAX_PIXELS = 40_000_000
STORE_MAX_SIDE = 1024  # larger images are downscaled before they are stored
MIN_SIDE = 32  # smaller images carry no usable detail
THUMB = 32  # near-duplicate thumbnails are THUMB x THUMB grayscale
JPEG_QUALITY = 95
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what find_images picks up
# The label folders, label = position: 0 benign, 1 malignant (the positive class).
CLASSES = ("benign", "malignant")

_NUMBER_RE = re.compile(r"(\d+)$")


def file_number(path: Path) -> int | None:
    """The trailing integer of a file's name (``ISIC_0024306.jpg``: 24306), if any: the
    numbering near-duplicate grouping reads (:func:`skin.data.grouping.near_duplicate_groups`)."""
    m = _NUMBER_RE.search(path.stem)
    return int(m.group(1)) if m else None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(root: Path) -> list[Path]:
    """Image files below ``root`` (nested folders too), by extension, case-insensitive, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        for name in files:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    return sorted(found)


def _to_rgb(img, note: list[str]):
    """Any PIL image -> RGB (alpha composited over white, high bit depths scaled)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) or 1.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
        note.append(f"{mode} scaled to 8 bit")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        note.append("alpha composited over white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class UnusableImage(ValueError):
    """A file that cannot be staged; the message is the reason."""


@dataclass
class PreparedImage:
    """An image as stage stores it: RGB JPEG bytes, and what was done to get them."""

    jpeg: bytes  # the original bytes when they were already usable
    converted: str  # "" when the original bytes are kept
    width: int
    height: int
    thumb: np.ndarray  # zero-mean, unit-norm THUMB x THUMB grayscale, flattened


def prepare_image(data: bytes, tf_decode=None) -> PreparedImage:
    """Check one image file's bytes and turn them into what stage stores.

    RGB JPEGs of at most ``STORE_MAX_SIDE`` px a side are kept byte for byte;
    anything else that decodes (PNG, alpha, grayscale, CMYK, palette, 16 bit,
    larger sides) is converted to an RGB JPEG. ``skin.data.dataset.load_images`` runs
    the same function, so a served image is exactly what training saw.
    Raises :class:`UnusableImage` with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnusableImage("not an image (no known image format)") from None
    except Image.DecompressionBombError as e:
        raise UnusableImage(f"decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unusable
        raise UnusableImage(f"not a readable image ({type(e).__name__}: {e})") from None
    width, height = img.size
    fmt = img.format or "?"
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise UnusableImage(f"too large: {width}x{height} px (limit {MAX_SIDE} px a side, "
                            f"{MAX_PIXELS // 1_000_000} Mpx; possible decompression bomb)")
    if min(width, height) < MIN_SIDE:
        raise UnusableImage(f"too small: {width}x{height} px (need >= {MIN_SIDE} px a side)")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated, corrupt: unusable, with the reason
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            raise UnusableImage(f"truncated {fmt} ({reason})") from None
        raise UnusableImage(f"corrupt {fmt} ({type(e).__name__}: {reason})") from None
    note: list[str] = []
    try:
        if getattr(img, "n_frames", 1) > 1:
            note.append(f"first of {img.n_frames} frames")
        rgb = _to_rgb(img, note)
        if fmt != "JPEG" or img.mode != "RGB":
            note.insert(0, f"{fmt} {img.mode} -> RGB JPEG")
        if max(width, height) > STORE_MAX_SIDE:
            scale = STORE_MAX_SIDE / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            rgb = rgb.resize(size, Image.LANCZOS)
            note.append(f"downscaled {width}x{height} -> {size[0]}x{size[1]}")
        jpeg = data
        if note:
            jpeg = encode_jpeg(rgb)
        elif tf_decode is not None and not tf_decode(jpeg):
            note.append("re-encoded: TensorFlow cannot decode the original JPEG")
            jpeg = encode_jpeg(rgb)
        gray = rgb.convert("L").resize((THUMB, THUMB), Image.BOX, reducing_gap=2.0)
    except Exception as e:  # noqa: BLE001
        raise UnusableImage(f"cannot be converted to RGB ({type(e).__name__}: {e})") from None
    thumb = np.asarray(gray, dtype=np.float32).ravel()
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    thumb = thumb / norm if norm > 1e-6 else np.zeros_like(thumb)
    return PreparedImage(jpeg, "; ".join(note), rgb.size[0], rgb.size[1], thumb)


def encode_jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def tf_decoder():
    """A thread-safe check that TensorFlow's decode_jpeg (the training decoder) accepts bytes."""
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TF is a dependency; stay usable without it
        return None

    def decode(data: bytes) -> bool:
        try:
            tf.io.decode_jpeg(data, channels=3)
            return True
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
            return False

    return decode
