"""GPU measurement on a lent device machine: a worker's training images/s at 224 px,
and pretrained EfficientNet-Lite0 fine-tuning epochs (BENCHMARKS.md, "GPU").

Runs the product's own model code (``skin.model.hypermodel.build_model``, ``skin.model.hypermodel.WarmupCosine``,
``skin.model.backbone``) under Keras 3. The device machines this project is lent cannot install
TensorFlow (no network there; the wheel is over the 64 MiB a call may carry), so this runs
Keras on the JAX backend (``KERAS_BACKEND=jax``, the machine's CUDA JAX) with the images in
memory instead of the worker's tf.data pipeline over staged shards; the network, the
augmentation layers, the optimiser and the schedule are the product's.

Input: ``python -m bench.gpu_pack`` writes the real ISIC images at 224 px with the
product's grouped 70/15/15 split (bench/quality_data.py, split seed 0) as one .npz of
JPEG bytes.

    KERAS_BACKEND=jax python -m bench.gpu --pack .gpudata/isic224.npz \
        --lite0-weights .gpudata/lite0.weights.h5 --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def decode(pack: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from PIL import Image

    z = np.load(pack)
    data, offs, labels, split = z["data"], z["offsets"], z["labels"], z["split"]
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(data[offs[i]:offs[i + 1]].tobytes()))
                                .convert("RGB"))
                     for i in range(len(labels))]).astype(np.float32)
    return {name: (imgs[split == k], labels[split == k].astype(np.float32))
            for k, name in enumerate(("train", "val", "test"))}


class EpochTimes:
    """Wall time of every epoch (seconds), as a Keras callback."""

    def __new__(cls):
        import keras

        class _T(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times: list[float] = []
                self.logs: list[dict] = []

            def on_epoch_begin(self, epoch, logs=None):
                self._t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._t)
                self.logs.append({k: float(v) for k, v in (logs or {}).items()})

        return _T()


def auc(y: np.ndarray, p: np.ndarray) -> float:
    from skin.serving.scoring import roc_auc

    return float(roc_auc(y, p))


def train(name: str, values: dict, parts, *, epochs: int, backbone=None, image_size: int = 224,
          seed: int = 0) -> dict:
    import keras

    from skin.model import hypermodel as M

    keras.utils.set_random_seed(seed)
    x, y = parts["train"]
    model = M.build_model(values, image_size, seed=seed, backbone=backbone)
    batch = int(values["batch_size"])
    steps = int(np.ceil(len(x) / batch))
    timer = EpochTimes()
    sched = M.WarmupCosine(float(values["learning_rate"]), epochs, steps,
                           cosine=values["lr_schedule"] == "cosine")
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[sched, timer])
    fit_s = time.perf_counter() - t0
    out = {"name": name, "epochs": epochs, "batch_size": batch, "train_images": len(x),
           "epoch_seconds": [round(t, 3) for t in timer.times],
           "train_images_per_s_first_epoch": round(len(x) / timer.times[0], 1),
           "train_images_per_s_steady": round(len(x) / float(np.median(timer.times[1:])), 1)
           if epochs > 1 else None,
           "fit_seconds": round(fit_s, 2), "params": int(model.count_params())}
    for part in ("val", "test"):
        xs, ys = parts[part]
        t0 = time.perf_counter()
        p = model.predict(xs, batch_size=128, verbose=0).ravel()
        out[f"{part}_auc"] = round(auc(ys, p), 4)
        out[f"{part}_predict_images_per_s"] = round(len(xs) / (time.perf_counter() - t0), 1)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--lite0-weights", default="")
    ap.add_argument("--scratch-epochs", type=int, default=3)
    ap.add_argument("--lite0-epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=0, help="first N images of each part (smoke runs)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import keras

    from skin.infra.config import load_experiment
    from skin.model.hypermodel import default_values

    report: dict = {"backend": keras.backend.backend(), "keras": keras.__version__,
                    "python": platform.python_version()}
    try:
        report["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=30).stdout.strip()
    except OSError:
        report["gpu"] = "unknown"
    if report["backend"] == "jax":
        import jax

        report["devices"] = [str(d) for d in jax.devices()]
        report["jax"] = jax.__version__
    t0 = time.perf_counter()
    parts = decode(args.pack)
    if args.limit:
        parts = {k: (x[:args.limit], y[:args.limit]) for k, (x, y) in parts.items()}
    report["decode_seconds"] = round(time.perf_counter() - t0, 1)
    report["sizes"] = {k: len(v[1]) for k, v in parts.items()}
    print(json.dumps(report), flush=True)

    exp = load_experiment(Path(__file__).resolve().parents[1] / "skin/experiments/default.yaml")
    scratch = default_values(exp.search.fixed)
    report["runs"] = []
    if args.scratch_epochs:
        report["runs"].append(train("from-scratch default recipe", scratch, parts,
                                    epochs=args.scratch_epochs))
    args.out.write_text(json.dumps(report, indent=1))

    if args.lite0_weights:
        from skin.model import backbone as B

        bb = B.fetch_weights("efficientnet_lite0", args.lite0_weights, True)
        values = default_values(dict(exp.search.fixed), "efficientnet_lite0", pretrained=True)
        values.update(learning_rate=3e-4, dense_units=0, dropout=0.2)
        report["runs"].append(train("efficientnet_lite0 ImageNet, fine-tuned", values, parts,
                                    epochs=args.lite0_epochs, backbone=bb))
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
