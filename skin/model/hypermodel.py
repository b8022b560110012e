"""The search space: a from-scratch dermoscopy CNN as a keras-tuner ``HyperModel``.

``SkinHyperModel(exp).build(hp)`` returns a compiled Keras 3 model whose input is
a float32 image with values 0..255 and side ``exp.data.image_size``. Rescaling and
augmentation are layers inside the model (built-in layers only, so
``keras.models.load_model(path, safe_mode=True)`` loads it); Keras runs the random
layers only when ``training=True``, so inference is deterministic.

``fit(hp, model, data_dir=..., epochs=...)`` builds the datasets with
``skin.data.dataset.dataset`` and trains with the hyperparameters that are not part of the
graph: batch size, learning-rate schedule (warm-up + cosine, per batch), class
weights and mixup.

The hyperparameters (``HYPERPARAMETER_NAMES``) and what they do:

==================  =====================================================================
``stem``            downsampling of the stem: 2 (a stride-2 conv) or 4 (plus a max-pool);
                    CPU cost falls with its square, and on this data 64 px through a
                    stride-2 stem is as good as 96 or 128 px (BENCHMARKS.md)
``blocks``          conv blocks, each halving the resolution (depth)
``filters``         filters of the first block; block ``i`` has ``filters * 2**i`` (<= 256)
``kernel_size``     conv kernel side
``block_type``      ``plain`` (2 convs), ``residual`` (2 convs + shortcut) or
                    ``separable`` (depthwise-separable convs + shortcut)
``batch_norm``      batch normalisation after each conv
``pooling``         head: ``avg`` (global average), ``max`` (global max) or ``flatten``
``dense_units``     units of the hidden dense layer (0: none)
``dropout``         dropout before the hidden dense layer and before the output
``optimizer``       ``adam``, ``adamw`` or ``sgd`` (Nesterov momentum 0.9)
``learning_rate``   peak learning rate
``weight_decay``    decoupled weight decay (``adamw`` and ``sgd`` only)
``lr_schedule``     ``constant`` or ``cosine`` (one warm-up epoch, then cosine to 0)
``label_smoothing`` binary cross-entropy label smoothing
``augment``         augmentation strength 0..1 (zoom, contrast, brightness, colour);
                    flips and rotations are always on: a lesion has no orientation
``mixup``           mixup alpha (0: off)
``class_weight``    weight the classes inversely to their frequency
``batch_size``      training batch size
==================  =====================================================================

An optional pretrained (or random) ``keras.applications`` network replaces the stem and
blocks (``exp.backbone``, ``skin.model.backbone``): the body's hyperparameters are then not
searched, and with pretrained weights the learning rate is searched lower.

Their ranges are data (``skin.model.space``): ``exp.search.space`` states any of them with
keras-tuner's types and ``exp.search.fixed`` pins any of them to one value; the rest keep
``skin.model.space.DEFAULT_SPACE``. ``SkinHyperModel`` checks them (``check_model_space``) and
declares them in one canonical order. The shipped default experiment pins the ones that
did not matter in the research recorded in BENCHMARKS.md, so the tuner spends its budget
where it counts. A confirmation trial's ``tuner/seed`` (skin.tuning.confirm) seeds the
initial weights, the augmentation and the data order (``trial_seed``); its ``tuner/fold``
(``trial_fold``) moves validation to that fold of the staged training part
(``skin.data.dataset.dataset(fold=...)``) for both datasets.

The published model built from trained ones (ensembles, test-time augmentation) is
:mod:`skin.model.inference`.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import keras_tuner

from skin.model import space as skin_space

HYPERPARAMETER_NAMES: tuple[str, ...] = skin_space.NAMES

MAX_FILTERS = 256
WARMUP_EPOCHS = 1.0
# The hyperparameter a confirmation trial (skin.tuning.confirm) carries: train with this seed.
SEED_KEY = "tuner/seed"
# ... and validate on this fold of the training part (skin.staging.stage; skin.data.dataset.dataset).
FOLD_KEY = "tuner/fold"


def validate_fixed(fixed: dict) -> None:
    """Raise ConfigError naming any key of ``search.fixed`` the model cannot take."""
    skin_space.check_model_space(_Search(fixed, {}))


class _Search:
    def __init__(self, fixed: dict, space: dict):
        self.fixed, self.space = fixed, space


# Learning rates searched when a pretrained backbone is fine-tuned (skin.model.backbone).
FINE_TUNE_LEARNING_RATES = skin_space.FINE_TUNE_LEARNING_RATES


def _define(hp: keras_tuner.HyperParameters, space: dict | None = None, backbone: str = "none",
            pretrained: bool = False) -> dict[str, Any]:
    """Declare the search space on ``hp`` in its canonical order; the values for this build.

    ``space``: an effective space (``skin.model.space.effective_space``: {name: {type: ...}}), or a
    ``search.fixed`` mapping ({name: value}) over the default space for ``backbone``.
    Hyperparameters the space leaves out (the body's, with a backbone) are not declared.
    """
    space = space or {}
    if not space or not all(isinstance(v, dict) and "type" in v for v in space.values()):
        space = skin_space.effective_space(_Search(space, {}), backbone, pretrained)
    return {name: skin_space.declare(hp, name, spec) for name, spec in space.items()}


def default_values(space: dict | None = None, backbone: str = "none",
                   pretrained: bool = False) -> dict[str, Any]:
    """The values a build takes when nothing is searched: each hyperparameter's default in
    ``space`` (as :func:`_define` reads it: a ``search.fixed`` mapping or an effective space)."""
    return _define(keras_tuner.HyperParameters(), space, backbone, pretrained)


def trial_seed(hp, base: int) -> int | None:
    """The seed of a confirmation trial (``tuner/seed`` = 1, 2, ...) mixed with ``base``;
    None for an ordinary trial (Keras draws its own)."""
    n = hp.values.get(SEED_KEY) if hp is not None else None
    if n is None:
        return None
    return (int(base) * 1_000_003 + int(n) * 7919) % (2 ** 31 - 1)


def trial_fold(hp) -> int | None:
    """The validation fold of a confirmation trial (``tuner/fold`` >= 1), else None."""
    n = hp.values.get(FOLD_KEY) if hp is not None else None
    return int(n) if n else None


def augmentation_layers(strength: float, seed: int | None) -> list[keras.layers.Layer]:
    """Random layers suited to dermoscopy; Keras skips them unless training=True.

    :func:`build_model` looks this name up at build time, so bench/quality_explore.py
    ``--zoom`` can swap in a variant for an exploration.
    """
    layers: list[keras.layers.Layer] = [
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed, name="aug_flip"),
        keras.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed, name="aug_rotate"),
    ]
    if strength > 0:
        s = float(strength)
        layers += [
            keras.layers.RandomZoom((-0.25 * s, 0.15 * s), fill_mode="reflect", seed=seed,
                                    name="aug_zoom"),
            keras.layers.RandomContrast(0.3 * s, value_range=(0, 255), seed=seed,
                                        name="aug_contrast"),
            keras.layers.RandomBrightness(0.2 * s, value_range=(0, 255), seed=seed,
                                          name="aug_brightness"),
            # Colour jitter: dermoscopes and cameras differ in white balance and saturation.
            keras.layers.RandomSaturation((0.5 - 0.25 * s, 0.5 + 0.25 * s), value_range=(0, 255),
                                          seed=seed, name="aug_saturation"),
            keras.layers.RandomHue(0.05 * s, value_range=(0, 255), seed=seed, name="aug_hue"),
        ]
    return layers


def _conv(x, filters, kernel, separable, batch_norm, name):
    if separable:
        x = keras.layers.SeparableConv2D(filters, kernel, padding="same", use_bias=not batch_norm,
                                         name=name + "_conv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, padding="same", use_bias=not batch_norm,
                                kernel_initializer="he_normal", name=name + "_conv")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=name + "_bn")(x)
    return x


def _conv_strided(x, filters, kernel, stride, batch_norm, name):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=not batch_norm,
                            kernel_initializer="he_normal", name=name + "_conv")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=name + "_bn")(x)
    return x


def _block(x, filters, kernel, block_type, batch_norm, name):
    separable = block_type == "separable"
    shortcut = x
    y = _conv(x, filters, kernel, separable, batch_norm, name + "_a")
    y = keras.layers.Activation("relu", name=name + "_a_relu")(y)
    y = _conv(y, filters, kernel, separable, batch_norm, name + "_b")
    if block_type != "plain":
        if shortcut.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, use_bias=not batch_norm,
                                           name=name + "_proj")(shortcut)
            if batch_norm:
                shortcut = keras.layers.BatchNormalization(name=name + "_proj_bn")(shortcut)
        y = keras.layers.Add(name=name + "_add")([y, shortcut])
    y = keras.layers.Activation("relu", name=name + "_b_relu")(y)
    return keras.layers.MaxPooling2D(2, padding="same", name=name + "_pool")(y)


def build_model(values: dict[str, Any], image_size: int, seed: int | None = None,
                backbone=None) -> keras.Model:
    """The compiled model for one set of hyperparameter values.

    ``backbone`` (a ``skin.model.backbone.Backbone``, weights resolved): its network replaces
    the searched body; augmentation, head and training stay as the values say.
    """
    v = values
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = inputs
    for layer in augmentation_layers(v["augment"], seed):
        x = layer(x)
    if backbone is not None:
        net = backbone.build(image_size)
        pre = backbone.preprocess()
        if pre is not None:
            x = pre(x)
        x = net(x)
    else:
        x = _body(x, v)
    if v["pooling"] == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif v["pooling"] == "max":
        x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    else:
        x = keras.layers.Flatten(name="pool")(x)
    if v["dropout"]:
        x = keras.layers.Dropout(v["dropout"], name="head_dropout")(x)
    if v["dense_units"]:
        x = keras.layers.Dense(v["dense_units"], activation="relu", name="head_dense")(x)
        if v["dropout"]:
            x = keras.layers.Dropout(v["dropout"], name="dense_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="malignant")(x)
    model = keras.Model(inputs, outputs, name="skin_cnn")

    lr, wd = float(v["learning_rate"]), float(v["weight_decay"])
    if v["optimizer"] == "adam":
        optimizer = keras.optimizers.Adam(lr)
    elif v["optimizer"] == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=wd)
    else:
        optimizer = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd or None)
    if wd and v["optimizer"] != "adam":
        # No decay on biases and batch-norm parameters.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=float(v["label_smoothing"])),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    return model


def _body(x, v: dict[str, Any]):
    """The searched from-scratch CNN: stem and blocks."""
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(x)
    stem = int(v["stem"])
    x = _conv_strided(x, v["filters"], v["kernel_size"], min(stem, 2), v["batch_norm"], "stem")
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    if stem == 4:
        x = keras.layers.MaxPooling2D(2, padding="same", name="stem_pool")(x)
    for i in range(v["blocks"]):
        filters = min(v["filters"] * 2 ** i, MAX_FILTERS)
        x = _block(x, filters, v["kernel_size"], v["block_type"], v["batch_norm"], f"block{i}")
    return x


class WarmupCosine(keras.callbacks.Callback):
    """Per-batch learning rate: linear warm-up, then cosine to zero at ``epochs``.

    Works with ``initial_epoch`` (Hyperband resumes a trial part-way), so the
    rate always depends on the absolute position in ``epochs``.
    """

    def __init__(self, peak: float, epochs: int, steps_per_epoch: int,
                 warmup_epochs: float = WARMUP_EPOCHS, cosine: bool = True):
        super().__init__()
        self.peak, self.epochs, self.steps = peak, max(1, epochs), max(1, steps_per_epoch)
        self.warmup = min(warmup_epochs, self.epochs / 4) * self.steps
        self.cosine = cosine
        self._epoch = 0

    def rate(self, step: float) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if not self.cosine:
            return self.peak
        total = self.epochs * self.steps
        progress = min(1.0, (step - self.warmup) / max(1.0, total - self.warmup))
        return self.peak * 0.5 * (1 + math.cos(math.pi * progress))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self.rate(self._epoch * self.steps + batch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())


def mixup(images, labels, alpha: float, seed: int | None = None):
    """Mix each batch with a shuffled copy of itself (a tf.data map function)."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    g1 = tf.random.gamma([n], alpha, seed=seed)
    g2 = tf.random.gamma([n], alpha, seed=None if seed is None else seed + 1)
    lam = g1 / (g1 + g2)
    order = tf.random.shuffle(tf.range(n), seed=seed)
    li = tf.reshape(lam, [-1, 1, 1, 1])
    images = images * li + tf.gather(images, order) * (1 - li)
    labels = labels * lam + tf.gather(labels, order) * (1 - lam)
    return images, labels


def class_weights(benign: int, malignant: int) -> dict[int, float]:
    total = benign + malignant
    return {0: total / (2.0 * max(1, benign)), 1: total / (2.0 * max(1, malignant))}


def fit_datasets(values: dict[str, Any], model: keras.Model, train, validation, *, epochs: int,
                 steps_per_epoch: int, class_counts: tuple[int, int] | None = None,
                 callbacks=None, seed: int | None = None, **kw):
    """Train on ready tf.data datasets with the hyperparameters outside the graph."""
    v = values
    callbacks = list(callbacks or [])
    callbacks.insert(0, WarmupCosine(float(v["learning_rate"]), epochs, steps_per_epoch,
                                     cosine=v["lr_schedule"] == "cosine"))
    if v["mixup"]:
        alpha = float(v["mixup"])
        train = train.map(lambda x, y: mixup(x, y, alpha, seed))
    if v["class_weight"] and class_counts:
        kw.setdefault("class_weight", class_weights(*class_counts))
    kw.setdefault("verbose", 0)
    kw.setdefault("shuffle", False)  # the datasets shuffle themselves
    return model.fit(train, validation_data=validation, epochs=epochs, callbacks=callbacks, **kw)


class SkinHyperModel(keras_tuner.HyperModel):
    """The search space over ``exp`` (image size, pinned hyperparameters, seed)."""

    def __init__(self, exp, name: str = "skin", tunable: bool = True, *, storage=None,
                 cache_dir=None):
        super().__init__(name=name, tunable=tunable)
        self.exp = exp
        self.fixed = dict(exp.search.fixed)
        skin_space.check_model_space(exp.search)
        self.space = skin_space.space_of(exp)
        self._storage, self._cache_dir = storage, cache_dir
        self._backbone = None

    def backbone(self):
        """The experiment's backbone with its weights fetched (once), or None."""
        b = self.exp.backbone
        if b.name == "none":
            return None
        if self._backbone is None:
            from skin.model.backbone import fetch_weights

            self._backbone = fetch_weights(b.name, b.weights, b.trainable, storage=self._storage,
                                           cache_dir=self._cache_dir)
        return self._backbone

    def values(self, hp: keras_tuner.HyperParameters) -> dict[str, Any]:
        return _define(hp, self.space)

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        seed = trial_seed(hp, self.exp.data.seed)
        if seed is not None:  # a confirmation trial: its own initial weights and augmentation
            keras.utils.set_random_seed(seed)
        return build_model(self.values(hp), self.exp.data.image_size, seed=seed,
                           backbone=self.backbone())

    def fit(self, hp, model, *, data_dir, epochs, callbacks=None, validation=True, **kw):
        from skin.data import dataset as skin_data

        v = self.values(hp)
        size, batch = self.exp.data.image_size, int(v["batch_size"])
        seed = trial_seed(hp, self.exp.data.seed) or self.exp.data.seed
        fold = trial_fold(hp)
        train = skin_data.dataset(data_dir, "train", size, batch, training=True, seed=seed,
                                  fold=fold)
        val = (skin_data.dataset(data_dir, "validation", size, batch, training=False, fold=fold)
               if validation else None)
        counts = _split_counts(data_dir, "train", fold)
        steps = _steps(train, counts, batch)
        if int(train.cardinality()) < 0:  # repeated: Keras needs to know where an epoch ends
            kw.setdefault("steps_per_epoch", steps)
        for key in ("x", "y", "validation_data"):  # keras-tuner may forward these; we own them
            kw.pop(key, None)
        return fit_datasets(v, model, train, val, epochs=epochs, steps_per_epoch=steps,
                            class_counts=counts[1:] if counts else None, callbacks=callbacks,
                            seed=seed, **kw)


def _split_counts(data_dir, split: str, fold: int | None = None
                  ) -> tuple[int, int, int] | None:
    """(count, benign, malignant) of a split from the staged manifest, if readable."""
    try:
        from skin.data import dataset as skin_data

        c = skin_data.class_counts(data_dir, split, fold)
        return sum(c.values()), int(c["benign"]), int(c["malignant"])
    except Exception:  # noqa: BLE001 -- counts only tune the schedule; fall back to the dataset
        return None


def _steps(train, counts, batch: int) -> int:
    n = int(train.cardinality())
    if n > 0:
        return n
    if counts:
        return max(1, math.ceil(counts[0] / batch))
    return 1


