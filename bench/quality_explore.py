"""Fast model research: train one configuration from memory and score it.

    taskset -c 1 .venv/bin/python -m bench.quality_explore --size 96 --epochs 20 \
        --set blocks=4 filters=32 --seeds 0 [--split-seed 0] [--threads 1]

Images come from bench/quality_data.py (in memory, reduced size, the product's grouped
split: train / validation / test = 70 / 15 / 15). The model is skin.model.hypermodel.build_model and
training is skin.model.hypermodel.fit_datasets: the same code the pipeline runs. The threshold
is chosen on validation (``skin.serving.scoring.choose_threshold``: highest with malignant
sensitivity >= --target); test figures are reported at it (``skin.serving.scoring``). Prints one
JSON line per run (and appends it to --log, default /tmp/skin-quality-explore.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import yaml

from skin.serving.scoring import choose_threshold, classification_metrics, roc_auc, roc_curve


def scores(y, p, thr):
    """Accuracy, sensitivity, specificity and confusion matrix at ``thr`` (the product's
    :func:`skin.serving.scoring.classification_metrics`), rounded for the log."""
    m = classification_metrics(y, p, thr, extended=False)
    return dict(acc=_round(m["accuracy"]), sens=_round(m["sensitivity"]),
                spec=_round(m["specificity"]), cm=m["confusion_matrix"])


def best_accuracy(y, p) -> float:
    """The highest accuracy any threshold at one of the scores reaches (an upper bound: the
    threshold is picked on the same data), from the product's ROC curve."""
    fpr, tpr, _ = roc_curve(y, p)
    positives = float(np.sum(y == 1))
    negatives = len(y) - positives
    return _round(float(np.max(tpr[1:] * positives + (1.0 - fpr[1:]) * negatives) / len(y)))


def summary(y, p, thr):
    return dict(auc=_round(roc_auc(y, p)), acc05=scores(y, p, 0.5)["acc"],
                at_thr=scores(y, p, thr), best_acc=best_accuracy(y, p))


def _round(x):
    return None if x is None else round(x, 4)


def predict_tta(model, x, batch, tta):
    import tensorflow as tf

    views = [x]
    if tta:
        views += [x[:, ::-1], x[:, :, ::-1], np.rot90(x, 1, axes=(1, 2))]
        if tta > 1:
            views += [np.rot90(x, 3, axes=(1, 2)), x[:, ::-1, ::-1],
                      np.rot90(x[:, ::-1], 1, axes=(1, 2)), np.rot90(x[:, :, ::-1], 1, axes=(1, 2))]
    out = [model.predict(tf.constant(np.ascontiguousarray(v), tf.float32), batch_size=batch,
                         verbose=0)[:, 0] for v in views]
    return np.mean(out, 0)


def cutmix(images, labels, prob):
    """With probability ``prob`` per image, paste a random box (side sqrt(1-lam) of the image,
    lam ~ U(0,1)) from a shuffled partner of the batch; the label is mixed by pasted area."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.float32)
    n = tf.shape(images)[0]
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    order = tf.random.shuffle(tf.range(n))
    partner, partner_y = tf.gather(images, order), tf.gather(labels, order)
    lam = tf.random.uniform([n])
    cut = tf.sqrt(1.0 - lam)
    ch = tf.cast(cut * tf.cast(h, tf.float32), tf.int32)
    cw = tf.cast(cut * tf.cast(w, tf.float32), tf.int32)
    cy = tf.random.uniform([n], 0, h, dtype=tf.int32)
    cx = tf.random.uniform([n], 0, w, dtype=tf.int32)
    y0, y1 = tf.maximum(cy - ch // 2, 0), tf.minimum(cy + ch // 2, h)
    x0, x1 = tf.maximum(cx - cw // 2, 0), tf.minimum(cx + cw // 2, w)
    rows, cols = tf.range(h)[None, :, None], tf.range(w)[None, None, :]
    box = ((rows >= y0[:, None, None]) & (rows < y1[:, None, None])
           & (cols >= x0[:, None, None]) & (cols < x1[:, None, None]))
    apply = tf.random.uniform([n]) < prob
    box = box & apply[:, None, None]
    area = tf.reduce_mean(tf.cast(box, tf.float32), axis=[1, 2])
    images = tf.where(box[..., None], partner, images)
    labels = labels * (1 - area) + partner_y * area
    return images, labels


def hair(images, labels, prob, max_hairs=8):
    """Draw up to ``max_hairs`` dark, slightly transparent segments (hairs across the lesion,
    as dermoscopy photos have them) on each image with probability ``prob``."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    n, h, w = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    yy = tf.cast(tf.range(h), tf.float32)[None, None, :, None]
    xx = tf.cast(tf.range(w), tf.float32)[None, None, None, :]
    # segment endpoints [n, k]: a random point and a direction, length 30-100% of the side
    cy, cx = tf.random.uniform([n, max_hairs]) * hf, tf.random.uniform([n, max_hairs]) * wf
    ang = tf.random.uniform([n, max_hairs]) * 3.14159
    length = (0.3 + 0.7 * tf.random.uniform([n, max_hairs])) * hf
    dy, dx = tf.sin(ang) * length / 2, tf.cos(ang) * length / 2
    ay, ax = (cy - dy)[..., None, None], (cx - dx)[..., None, None]
    by, bx = (cy + dy)[..., None, None], (cx + dx)[..., None, None]
    vy, vx = by - ay, bx - ax
    t = ((yy - ay) * vy + (xx - ax) * vx) / (vy * vy + vx * vx + 1e-6)
    t = tf.clip_by_value(t, 0.0, 1.0)
    dist = tf.sqrt((yy - ay - t * vy) ** 2 + (xx - ax - t * vx) ** 2)  # [n, k, h, w]
    width = (0.5 * tf.random.uniform([n, max_hairs]) - 0.3)[..., None, None] * hf / 64.0
    count = tf.random.uniform([n], 1, max_hairs + 1, dtype=tf.int32)
    on = tf.sequence_mask(count, max_hairs)[..., None, None]
    on = on & (tf.random.uniform([n])[:, None, None, None] < prob)
    alpha = tf.where(on, tf.clip_by_value(1.0 - (dist - width), 0.0, 1.0) * 0.75, 0.0)
    cover = 1.0 - tf.reduce_prod(1.0 - alpha, axis=1)  # [n, h, w]
    shade = tf.random.uniform([n, 1, 1, 1], 10.0, 60.0)  # near-black to dark brown
    images = images * (1.0 - cover[..., None]) + shade * cover[..., None]
    return images, labels


def split_data(size: int, split_seed: int):
    """The grouped 70/15/15 split of the in-memory images: ({part: images}, {part: labels},
    the part index of every image)."""
    from bench import quality_data

    x, y, paths = quality_data.load(size)
    sp = quality_data.split(paths, y, split_seed)
    parts = ("train", "val", "test")
    return ({k: x[sp == i] for i, k in enumerate(parts)},
            {k: y[sp == i].astype(np.float32) for i, k in enumerate(parts)}, sp)


def apply_sets(values: dict, sets: list[str]) -> dict:
    """``values`` with ``name=value`` items (YAML values) applied over them; an unknown
    name exits with a message."""
    values = dict(values)
    for item in sets:
        k, val = item.split("=", 1)
        if k not in values:
            raise SystemExit(f"unknown hyperparameter {k}")
        values[k] = yaml.safe_load(val)
    return values


def configured_values(sets: list[str], backbone: str = "none") -> dict:
    """The hypermodel's default values with ``name=value`` items applied over them."""
    from skin.model.hypermodel import default_values

    return apply_sets(default_values({}, backbone), sets)


def geometric_augmentation(zoom: float, colour: bool):
    """A replacement for skin.model.hypermodel.augmentation_layers (exploration only): flips and rotation
    as always, zoom in/out by up to ``zoom``, and the colour layers of ``strength`` only when
    ``colour`` (else none), to tell scale jitter and colour jitter apart."""
    import keras

    from skin.model import hypermodel as M

    stock = M.augmentation_layers

    def augmentation(strength, seed):
        layers = [layer for layer in stock(strength, seed)
                  if layer.name in ("aug_flip", "aug_rotate")
                  or (colour and layer.name not in ("aug_zoom",))]
        if zoom:
            layers.insert(2, keras.layers.RandomZoom((-zoom, zoom), fill_mode="reflect",
                                                     seed=seed, name="aug_zoom"))
        return layers

    M.augmentation_layers = augmentation


def sam_model(model, rho: float):
    """``model`` rebuilt as a Keras model whose train step is sharpness-aware minimisation
    (Foret et al. 2021): the gradient is taken at the weights moved by ``rho`` along the
    normalised gradient, then applied at the original weights (2 passes per batch)."""
    import keras
    import tensorflow as tf

    class SAM(keras.Model):
        def train_step(self, data):
            x, y = data[:2]
            tv = self.trainable_variables
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            grads = tape.gradient(loss, tv)
            scale = rho / (tf.linalg.global_norm(grads) + 1e-12)
            eps = [g * scale for g in grads]
            for v, e in zip(tv, eps):
                v.assign_add(e)
            with tf.GradientTape() as tape:
                loss2 = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss2, tv)
            for v, e in zip(tv, eps):
                v.assign_sub(e)
            self.optimizer.apply(grads, tv)
            for m in self.metrics:
                if m.name == "loss":
                    m.update_state(loss)
                else:
                    m.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    sam = SAM(inputs=model.inputs, outputs=model.outputs, name=model.name)
    sam.compile(optimizer=model.optimizer, loss=model.loss, metrics=[
        keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")])
    return sam


def EpochEval(xv, yv, xt, yt):
    """Per-epoch validation and test ROC AUC (one view), to compare weight choices afterwards."""
    import keras

    class _E(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.val, self.test = [], []

        def on_epoch_end(self, epoch, logs=None):
            for ys, x, out in ((yv, xv, self.val), (yt, xt, self.test)):
                out.append(round(roc_auc(ys, self.model.predict(x, batch_size=128, verbose=0)[:, 0]), 4))

    return _E()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--set", nargs="*", default=[], help="name=value hyperparameters")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--tta", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--train-on-val", action="store_true",
                    help="also train on validation (threshold then from the train+val fit)")
    ap.add_argument("--eval-sizes", type=int, nargs="*", default=[],
                    help="also score the trained weights on images resized to these sizes "
                         "(train-test resolution discrepancy; global pooling makes it possible)")
    ap.add_argument("--cutmix", type=float, default=0.0,
                    help="probability of pasting a random box from another image of the batch "
                         "(labels mixed by area); a prototype, not in the product")
    ap.add_argument("--hair", type=float, default=0.0,
                    help="probability of drawing 1-8 random dark hairs (thin segments) on a "
                         "training image; a prototype, not in the product")
    ap.add_argument("--save-preds", default="",
                    help="directory: save each seed's validation and test predictions there "
                         "(TAG-sSEED.npz), so ensembles across runs can be scored afterwards")
    ap.add_argument("--sam", type=float, default=0.0,
                    help="sharpness-aware minimisation with this rho (0: off); a prototype")
    ap.add_argument("--epoch-eval", action="store_true",
                    help="record validation and test ROC AUC after every epoch")
    ap.add_argument("--backbone", default="none",
                    help="a skin.model.backbone name, randomly initialised, in place of the CNN body")
    ap.add_argument("--backbone-weights", default="",
                    help="backbone.weights for --backbone: a local file or gs:// URI (e.g. a "
                         "`skin weights import` output); pretrained, batch norm frozen")
    ap.add_argument("--frozen", action="store_true",
                    help="with --backbone-weights: train the head alone (backbone.trainable false)")
    ap.add_argument("--zoom", type=float, default=None,
                    help="replace the augmentation's zoom by +-ZOOM (exploration of scale jitter)")
    ap.add_argument("--no-colour", action="store_true",
                    help="with --zoom: drop the contrast/brightness/colour layers")
    ap.add_argument("--log", default="/tmp/skin-quality-explore.jsonl")
    args = ap.parse_args(argv)

    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from bench import quality_data
    from skin.model import hypermodel as M

    if args.bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    xs, ys, sp = split_data(args.size, args.split_seed)
    values = configured_values(args.set, args.backbone)
    backbone = None
    if args.backbone != "none":
        from skin.model.backbone import fetch_weights

        backbone = fetch_weights(args.backbone, args.backbone_weights, not args.frozen)
    if args.zoom is not None:
        geometric_augmentation(args.zoom, colour=not args.no_colour)
    results = []
    ens_v, ens_t = [], []
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        model = M.build_model(values, args.size, seed=None, backbone=backbone)
        if args.sam:
            model = sam_model(model, args.sam)
        callbacks = []
        if args.epoch_eval:
            ee = EpochEval(xs["val"].astype(np.float32), ys["val"], xs["test"].astype(np.float32),
                           ys["test"])
            callbacks.append(ee)
        bs = int(values["batch_size"])
        tx, ty = xs["train"], ys["train"]
        if args.train_on_val:
            tx, ty = np.concatenate([tx, xs["val"]]), np.concatenate([ty, ys["val"]])
        train = (tf.data.Dataset.from_tensor_slices((tx, ty))
                 .shuffle(len(tx), seed=seed, reshuffle_each_iteration=True)
                 .batch(bs).map(lambda a, b: (tf.cast(a, tf.float32), b)).prefetch(2))
        val = (tf.data.Dataset.from_tensor_slices((xs["val"], ys["val"])).batch(128)
               .map(lambda a, b: (tf.cast(a, tf.float32), b)))
        if args.cutmix:
            train = train.map(lambda a, b: cutmix(a, b, args.cutmix))
        if args.hair:
            train = train.map(lambda a, b: hair(a, b, args.hair))
        steps = math.ceil(len(tx) / bs)
        t0 = time.time()
        hist = M.fit_datasets(values, model, train, val, epochs=args.epochs, steps_per_epoch=steps,
                              class_counts=(int((ty == 0).sum()), int((ty == 1).sum())), seed=seed,
                              callbacks=callbacks, verbose=2)
        train_s = time.time() - t0
        h = hist.history
        variants = {}
        for tta in sorted({0, args.tta, 2}):
            pv = predict_tta(model, xs["val"].astype(np.float32), 128, tta)
            pt = predict_tta(model, xs["test"].astype(np.float32), 128, tta)
            thr = choose_threshold(ys["val"], pv, args.target)
            variants[tta] = dict(thr=round(thr, 4), val=summary(ys["val"], pv, thr),
                                 test=summary(ys["test"], pt, thr))
        pv = predict_tta(model, xs["val"].astype(np.float32), 128, args.tta)
        pt = predict_tta(model, xs["test"].astype(np.float32), 128, args.tta)
        thr = choose_threshold(ys["val"], pv, args.target)
        ens_v.append(pv)
        ens_t.append(pt)
        if args.save_preds:
            Path(args.save_preds).mkdir(parents=True, exist_ok=True)
            np.savez(Path(args.save_preds) / f"{args.tag}-s{seed}.npz", val=pv, test=pt,
                     y_val=ys["val"], y_test=ys["test"], split_seed=args.split_seed)
        res = dict(
            tag=args.tag, size=args.size, epochs=args.epochs, seed=seed, split_seed=args.split_seed,
            tta=args.tta, bf16=args.bf16, threads=args.threads, train_s=round(train_s, 1),
            img_s=round(args.epochs * len(tx) / train_s, 1), params=model.count_params(),
            set=args.set, backbone=args.backbone, backbone_weights=args.backbone_weights,
            frozen=args.frozen, zoom=args.zoom, colour=not args.no_colour,
            thr=round(thr, 4),
            val=summary(ys["val"], pv, thr), test=summary(ys["test"], pt, thr),
            curve_val_auc=[round(a, 3) for a in h.get("val_auc", [])],
            curve_val_acc=[round(a, 3) for a in h.get("val_accuracy", [])],
            final_loss=round(h["loss"][-1], 4),
            tta_variants={str(k): dict(val_auc=v["val"]["auc"], test_auc=v["test"]["auc"],
                                       val_acc05=v["val"]["acc05"], test_acc05=v["test"]["acc05"],
                                       test_thr=v["test"]["at_thr"])
                          for k, v in variants.items()},
        )
        if args.epoch_eval:
            res["epoch_auc"] = dict(val=ee.val, test=ee.test)
        for size in args.eval_sizes:
            xe, _, _ = quality_data.load(size)
            other = M.build_model(values, size, seed=None, backbone=backbone)
            other.set_weights(model.get_weights())
            pv = predict_tta(other, xe[sp == 1].astype(np.float32), 128, args.tta)
            pt = predict_tta(other, xe[sp == 2].astype(np.float32), 128, args.tta)
            thr_e = choose_threshold(ys["val"], pv, args.target)
            res.setdefault("eval_sizes", {})[str(size)] = dict(
                thr=round(thr_e, 4), val=summary(ys["val"], pv, thr_e),
                test=summary(ys["test"], pt, thr_e))
        results.append(res)
        line = json.dumps(res)
        print(line, flush=True)
        with open(args.log, "a") as f:
            f.write(line + "\n")
    if len(results) > 1:
        pv, pt = np.mean(ens_v, 0), np.mean(ens_t, 0)
        thr = choose_threshold(ys["val"], pv, args.target)
        ens = dict(tag=args.tag + "-ensemble", seeds=args.seeds, set=args.set, size=args.size,
                   epochs=args.epochs, split_seed=args.split_seed,
                   val=summary(ys["val"], pv, thr), test=summary(ys["test"], pt, thr))
        print(json.dumps(ens), flush=True)
        with open(args.log, "a") as f:
            f.write(json.dumps(ens) + "\n")
        for part in ("val", "test"):
            for key in ("auc", "acc05"):
                a = np.array([r[part][key] for r in results])
                print(f"{part} {key}: mean {a.mean():.4f} sd {a.std():.4f}")
            a = np.array([r[part]["at_thr"]["acc"] for r in results])
            print(f"{part} acc@thr: mean {a.mean():.4f} sd {a.std():.4f}")


if __name__ == "__main__":
    main()
