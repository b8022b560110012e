"""A synthetic lesion folder, for laptops and tests without the real images.

The two classes differ the way the dermoscopy "ABCD" rule describes
(asymmetry, border, colour):

- benign: a round, smooth-edged blob of one even brown on a skin-toned
  background;
- malignant: an asymmetric blob with a ragged border and several colours
  (dark brown, near-black, red and blue-grey patches).

Size, position, skin tone, lighting and noise vary in both classes, so a
model has to look at shape and colour, not at a single pixel statistic. A
small CNN separates the classes in a few epochs. Everything follows from
``seed``: the same call writes byte-identical files.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from skin.data.images import CLASSES

log = logging.getLogger(__name__)

_SKIN_TONES = np.array([(232, 190, 160), (215, 165, 130), (190, 140, 105), (240, 205, 180),
                        (200, 150, 120)], dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 8, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + 0.12 * ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle))
    img = tone[None, None, :] * light[:, :, None]
    img += rng.normal(0, 4, (size, size, 3))
    return img


def _outline(rng: np.random.Generator, size: int, ragged: bool) -> list[tuple[float, float]]:
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12) * size
    r0 = rng.uniform(0.15, 0.30) * size
    n = 180
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    if ragged:
        radius = np.full(n, r0)
        # low-frequency lobes (asymmetry) plus high-frequency jaggedness (border)
        for k in range(1, 4):
            radius += r0 * rng.uniform(0.10, 0.28) * np.cos(k * theta + rng.uniform(0, 6.3))
        for k in (7, 11, 17, 23):
            radius += r0 * rng.uniform(0.03, 0.09) * np.cos(k * theta + rng.uniform(0, 6.3))
        radius += r0 * rng.normal(0, 0.04, n)
        stretch = (rng.uniform(1.0, 1.4), rng.uniform(0.7, 1.0))
    else:
        radius = np.full(n, r0)
        stretch = (rng.uniform(1.0, 1.25), rng.uniform(0.85, 1.0))
    rot = rng.uniform(0, math.pi)
    x = radius * np.cos(theta) * stretch[0]
    y = radius * np.sin(theta) * stretch[1]
    xr = cx + x * math.cos(rot) - y * math.sin(rot)
    yr = cy + x * math.sin(rot) + y * math.cos(rot)
    return list(zip(xr.tolist(), yr.tolist()))


def _mask(size: int, outline: list[tuple[float, float]], blur: float) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(outline, fill=255)
    if blur:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(m, dtype=np.float32) / 255.0


def _lesion(rng: np.random.Generator, size: int, malignant: bool) -> Image.Image:
    img = _background(rng, size)
    outline = _outline(rng, size, ragged=malignant)
    if not malignant:
        mask = _mask(size, outline, blur=size / 40)
        colour = np.array([140, 92, 60], np.float32) + rng.normal(0, 10, 3)
        layer = np.broadcast_to(colour, img.shape) + rng.normal(0, 3, img.shape)
        img = img * (1 - mask[..., None] * 0.9) + layer * mask[..., None] * 0.9
    else:
        mask = _mask(size, outline, blur=size / 160)
        base = np.array([95, 55, 35], np.float32) + rng.normal(0, 10, 3)
        layer = np.broadcast_to(base, img.shape).copy()
        # black, red, blue-grey veil, dark brown, whitish regression
        palette = [(25, 15, 15), (170, 40, 40), (80, 95, 140), (55, 30, 20), (215, 195, 185)]
        for _ in range(int(rng.integers(3, 6))):
            colour = np.array(palette[int(rng.integers(len(palette)))], np.float32)
            blob = _mask(size, _outline(rng, size, ragged=True), blur=size / 60)
            # shrink and shift each patch somewhere inside the lesion
            shift = rng.integers(-size // 6, size // 6 + 1, 2)
            blob = np.roll(blob, tuple(shift), axis=(0, 1))
            scale = rng.uniform(0.6, 0.95)
            layer = layer * (1 - blob[..., None] * scale) + colour * blob[..., None] * scale
        layer += rng.normal(0, 6, img.shape)
        img = img * (1 - mask[..., None] * 0.95) + layer * mask[..., None] * 0.95
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def generate(out_dir: str | Path, per_class: int, size: int = 128, seed: int = 0) -> Path:
    """Write ``per_class`` JPEGs into ``out_dir/benign`` and ``out_dir/malignant``.

    Files are named ``0.jpg``, ``1.jpg``... like the real dataset; returns ``out_dir``.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    out = Path(out_dir)
    for label_index, label in enumerate(CLASSES):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, label_index, i])
            _lesion(rng, size, malignant=label_index == 1).save(
                folder / f"{i}.jpg", "JPEG", quality=92)
    log.info("generated %d synthetic images per class (%dx%d) in %s", per_class, size, size, out)
    return out
