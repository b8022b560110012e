"""Prototype: self-supervised pretraining (SimCLR) on the training images, then the recipe.

    taskset -c 1 .venv/bin/python -m bench.quality_ssl --size 64 --pretrain-epochs 100 \
        --epochs 60 --set stem=2 filters=16 augment=0.25 --seeds 0 --tta 2 --tag ssl

The encoder of ``skin.model.hypermodel.build_model`` (everything up to the global pooling) is
pretrained with the NT-Xent contrastive loss (Chen et al. 2020) on two strongly
augmented views of each *training* image, labels unused (validation and test images
are not seen); a projection head (128 -> 64) is discarded afterwards. The encoder's
weights then start the usual supervised training (``skin.model.hypermodel.fit_datasets``), and
the model is scored like bench/quality_explore.py (same split, threshold on
validation, 8-view TTA), one JSON line per seed appended to --log. Not in the product.
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--pretrain-epochs", type=int, default=100)
    ap.add_argument("--pretrain-batch", type=int, default=128)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--tta", type=int, default=2)
    ap.add_argument("--tag", default="ssl")
    ap.add_argument("--save-preds", default="")
    ap.add_argument("--log", default="/tmp/skin-quality-explore.jsonl")
    args = ap.parse_args(argv)

    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from bench.quality_explore import configured_values, predict_tta, split_data, summary
    from skin.model import hypermodel as M
    from skin.serving.scoring import choose_threshold

    xs, ys, _ = split_data(args.size, args.split_seed)
    values = configured_values(args.set)

    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        # --- pretraining: the encoder of the supervised model, no augmentation inside
        plain = dict(values, augment=0.0)
        full = M.build_model(plain, args.size, seed=None)
        encoder = keras.Model(full.input, full.get_layer("pool").output, name="encoder")
        views = keras.Sequential(
            [keras.layers.RandomFlip("horizontal_and_vertical"),
             keras.layers.RandomRotation(0.5, fill_mode="reflect"),
             keras.layers.RandomZoom((-0.5, 0.0), fill_mode="reflect"),  # crops to 50-100 %
             keras.layers.RandomContrast(0.4, value_range=(0, 255)),
             keras.layers.RandomBrightness(0.3, value_range=(0, 255)),
             keras.layers.RandomSaturation((0.3, 0.7), value_range=(0, 255)),
             keras.layers.RandomHue(0.08, value_range=(0, 255))], name="views")
        head = keras.Sequential([keras.layers.Dense(128, activation="relu"),
                                 keras.layers.Dense(64)], name="projection")
        bs = args.pretrain_batch
        steps = len(xs["train"]) // bs
        total = steps * args.pretrain_epochs
        sched = keras.optimizers.schedules.CosineDecay(
            0.0, max(1, total - steps), warmup_target=args.pretrain_lr, warmup_steps=steps)
        opt = keras.optimizers.AdamW(sched, weight_decay=1e-4)
        tau = args.temperature

        @tf.function
        def step(batch):
            a = views(batch, training=True)
            b = views(batch, training=True)
            with tf.GradientTape() as tape:
                za = tf.math.l2_normalize(head(encoder(a, training=True), training=True), 1)
                zb = tf.math.l2_normalize(head(encoder(b, training=True), training=True), 1)
                z = tf.concat([za, zb], 0)
                sim = tf.matmul(z, z, transpose_b=True) / tau
                n = tf.shape(za)[0]
                sim = sim - 1e9 * tf.eye(2 * n)
                targets = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], 0)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, sim))
            tv = encoder.trainable_variables + head.trainable_variables
            opt.apply(tape.gradient(loss, tv), tv)
            return loss

        ds = (tf.data.Dataset.from_tensor_slices(xs["train"]).shuffle(len(xs["train"]), seed=seed)
              .batch(bs, drop_remainder=True).map(lambda a: tf.cast(a, tf.float32)).prefetch(2))
        t0 = time.time()
        ssl_curve = []
        for ep in range(args.pretrain_epochs):
            losses = [float(step(b)) for b in ds]
            ssl_curve.append(round(float(np.mean(losses)), 4))
            print(f"pretrain epoch {ep + 1}/{args.pretrain_epochs} loss {ssl_curve[-1]:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        pretrain_s = time.time() - t0

        # --- supervised training from the pretrained encoder
        model = M.build_model(values, args.size, seed=None)
        copied = 0
        for layer in encoder.layers:
            if layer.weights and layer.name in {m.name for m in model.layers}:
                model.get_layer(layer.name).set_weights(layer.get_weights())
                copied += 1
        vb = int(values["batch_size"])
        train = (tf.data.Dataset.from_tensor_slices((xs["train"], ys["train"]))
                 .shuffle(len(xs["train"]), seed=seed, reshuffle_each_iteration=True)
                 .batch(vb).map(lambda a, b: (tf.cast(a, tf.float32), b)).prefetch(2))
        val = (tf.data.Dataset.from_tensor_slices((xs["val"], ys["val"])).batch(128)
               .map(lambda a, b: (tf.cast(a, tf.float32), b)))
        t1 = time.time()
        hist = M.fit_datasets(values, model, train, val, epochs=args.epochs,
                              steps_per_epoch=math.ceil(len(xs["train"]) / vb), seed=seed,
                              verbose=2)
        train_s = time.time() - t1
        pv = predict_tta(model, xs["val"].astype(np.float32), 128, args.tta)
        pt = predict_tta(model, xs["test"].astype(np.float32), 128, args.tta)
        thr = choose_threshold(ys["val"], pv, args.target)
        if args.save_preds:
            Path(args.save_preds).mkdir(parents=True, exist_ok=True)
            np.savez(Path(args.save_preds) / f"{args.tag}-s{seed}.npz", val=pv, test=pt,
                     y_val=ys["val"], y_test=ys["test"], split_seed=args.split_seed)
        res = dict(tag=args.tag, size=args.size, epochs=args.epochs, seed=seed,
                   split_seed=args.split_seed, tta=args.tta, set=args.set,
                   pretrain=dict(epochs=args.pretrain_epochs, batch=bs, lr=args.pretrain_lr,
                                 temperature=tau, seconds=round(pretrain_s, 1),
                                 layers_copied=copied, loss=ssl_curve[::10] + ssl_curve[-1:]),
                   train_s=round(train_s, 1), thr=round(thr, 4),
                   val=summary(ys["val"], pv, thr), test=summary(ys["test"], pt, thr),
                   curve_val_auc=[round(a, 3) for a in hist.history.get("val_auc", [])])
        line = json.dumps(res)
        print(line, flush=True)
        with open(args.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
