"""Pack the real ISIC images for bench/gpu.py: every image at 224 px (bench/quality_data.py's
bilinear resize), re-encoded as JPEG quality 90, with the product's grouped 70/15/15 split
(quality_data.split, split seed 0), as one .npz (about 29 MB) that fits the 64 MiB a device
call may carry. Never commit the output (images stay out of the repository).

    .venv/bin/python -m bench.gpu_pack .gpudata/isic224.npz
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench import quality_data as Q


def main(out: str, size: int = 224, split_seed: int = 0) -> None:
    x, y, paths = Q.load(size)
    sp = Q.split(paths, y, split_seed)
    blobs, offsets = [], [0]
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
        offsets.append(offsets[-1] + len(blobs[-1]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=np.array(offsets),
             labels=y, split=sp)
    print(f"{out}: {len(y)} images, parts {np.bincount(sp).tolist()}, {offsets[-1] / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpudata/isic224.npz")
