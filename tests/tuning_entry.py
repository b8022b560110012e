"""One tuning role with a tiny test hypermodel, as its own process (tests/test_tuning*.py).

    KERASTUNER_TUNER_ID=tuner0 SKIN_CONFIG=exp.yaml python tests/tuning_entry.py \
        [--epoch-seconds S] [--batch-seconds S] [--fail] [--freeze-before-saving-epoch N]
        [--space median|inject] [--hang-after-batches N]

The role, the experiment and the chief's address come from the environment,
exactly as for ``skin tune``; only the hypermodel differs: a small dense
network on fixed random data (it ignores the staged data), so a trial takes
well under a second plus ``--epoch-seconds`` per epoch.

``--freeze-before-saving-epoch N`` is a fault: the worker stops itself
(SIGSTOP) once, after reporting its N-th epoch of a trial and before uploading
that epoch's files, as a worker frozen or partitioned at the worst moment
would; the test continues it with SIGCONT.

``--space median``: ``units`` and a ``learning_rate`` of 0.0 (cannot learn: the output layer
starts at zero, so every row scores the same and val_auc stays 0.5) or 0.1 (learns).
``--space inject``: ``units`` 1..4 on a fixed learning rate, and val_auc is injected from
``INJECTED`` by (units, ``tuner/seed``): the best single score is not the best mean.
A confirmation trial's ``tuner/seed`` seeds Keras; its ``tuner/fold`` (the staged data's
validation fold it would validate on) is logged, "validates on fold N".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import keras_tuner
import numpy as np


class Slow(keras.callbacks.Callback):
    """``epoch_seconds`` more before each epoch; ``batch_seconds`` more before each of its
    3 batches (a long epoch that is still alive)."""

    def __init__(self, epoch_seconds: float, batch_seconds: float):
        super().__init__()
        self.epoch_seconds, self.batch_seconds = epoch_seconds, batch_seconds

    def on_epoch_begin(self, epoch, logs=None):
        time.sleep(self.epoch_seconds)

    def on_train_batch_begin(self, batch, logs=None):
        time.sleep(self.batch_seconds)


# (units, tuner/seed) -> val_auc of every epoch; seed 0: an ordinary trial.
INJECTED = {(1, 0): 0.95, (1, 1): 0.70, (1, 2): 0.72,   # a lucky first draw: mean 0.79
            (2, 0): 0.90, (2, 1): 0.89, (2, 2): 0.91,   # steady: mean 0.90
            (3, 0): 0.60, (4, 0): 0.55}


class Inject(keras.callbacks.Callback):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["val_auc"] = self.value


class EpochBegins(keras.callbacks.Callback):
    """Logs each epoch as it begins (the churn benchmark counts epochs begun: lost work)."""

    def on_epoch_begin(self, epoch, logs=None):
        logging.getLogger("tiny").info("epoch %d begins", epoch + 1)


class Hang(keras.callbacks.Callback):
    """After ``after`` training batches in this process, the next batch blocks for good
    (a wedged input pipeline or driver): only the worker's watchdog ends the process."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.seen = after, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen > self.after:
            logging.getLogger("tiny").warning("hanging in batch %d for good", batch + 1)
            for h in logging.getLogger().handlers:
                h.flush()
            while True:
                time.sleep(3600)


class TinyHyperModel(keras_tuner.HyperModel):
    """A dense classifier on 128 fixed random rows; metrics ``auc`` and ``accuracy``."""

    uses_data = False  # the worker skips syncing the staged data

    def __init__(self, epoch_seconds: float = 0.0, fail: bool = False,
                 batch_seconds: float = 0.0, space: str = "",
                 hang_after_batches: int = -1):  # fail: every fit raises
        super().__init__()
        self.space = space
        self.hang = Hang(hang_after_batches) if hang_after_batches >= 0 else None
        self.epoch_seconds = epoch_seconds
        self.batch_seconds = batch_seconds
        self.fail = fail

    def build(self, hp):
        if hp.values.get("tuner/seed") is not None:  # a confirmation trial
            keras.utils.set_random_seed(int(hp.values["tuner/seed"]))
        out_init = "glorot_uniform"
        if self.space == "median":
            units = hp.Choice("units", [64, 96, 128, 192])
            rate = hp.Choice("learning_rate", [0.1, 0.0])
            out_init = "zeros"
        elif self.space == "inject":
            units = hp.Choice("units", [1, 2, 3, 4])
            rate = 0.01
        else:
            units = hp.Int("units", 4, 64, step=4)
            rate = hp.Float("learning_rate", 1e-3, 1e-1, sampling="log")
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(units, activation="relu"),
                                  keras.layers.Dense(1, activation="sigmoid",
                                                     kernel_initializer=out_init)])
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc"), "accuracy"],
                      run_eagerly=True)  # 3 batches: tracing a graph would cost more
        return model

    def fit(self, hp, model, *, epochs, callbacks=None, initial_epoch=0, data_dir=None, **kw):
        if self.fail:
            raise ValueError("this search space is broken on purpose")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 8)).astype("float32")
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("float32")
        slow = [Slow(self.epoch_seconds, self.batch_seconds)] \
            if self.epoch_seconds or self.batch_seconds else []
        if hp.values.get("tuner/fold") is not None:
            logging.getLogger("tiny").info("trial validates on fold %d",
                                           int(hp.values["tuner/fold"]))
        if self.space == "inject":
            key = (hp.values["units"], int(hp.values.get("tuner/seed") or 0))
            slow.append(Inject(INJECTED.get(key, INJECTED[(key[0], 0)])))
        slow = [EpochBegins()] + slow + ([self.hang] if self.hang is not None else [])
        return model.fit(x[:96], y[:96], validation_data=(x[96:], y[96:]), epochs=epochs,
                         initial_epoch=initial_epoch, callbacks=slow + list(callbacks or []),
                         batch_size=32, verbose=0)


def _freeze_before_saving_epoch(n: int) -> None:
    import signal

    from skin.tuning import checkpoints

    save_epoch, frozen = checkpoints.TrialFiles.save_epoch, []

    def freezing(self, trial_id, model, state, *args, **kwargs):
        if state["epoch"] == n and not frozen:
            frozen.append(trial_id)
            logging.getLogger("skin.tuning").warning(
                "FAULT: freezing before saving epoch %d of trial %s", n, trial_id)
            os.kill(os.getpid(), signal.SIGSTOP)
        return save_epoch(self, trial_id, model, state, *args, **kwargs)

    checkpoints.TrialFiles.save_epoch = freezing


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epoch-seconds", type=float, default=0.0)
    parser.add_argument("--batch-seconds", type=float, default=0.0)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--freeze-before-saving-epoch", type=int, default=0, metavar="N")
    parser.add_argument("--space", default="", choices=("", "median", "inject"))
    parser.add_argument("--hang-after-batches", type=int, default=-1)
    args = parser.parse_args()
    if args.freeze_before_saving_epoch:
        _freeze_before_saving_epoch(args.freeze_before_saving_epoch)
    from prometheus_client import CollectorRegistry

    from skin import tuning
    from skin.context import RoleContext
    from skin.infra.config import load_experiment
    from skin.infra.runtime import runtime_from_env
    from skin.infra.storage import Storage
    from skin.metrics import server as metrics

    runtime = runtime_from_env()
    logging.basicConfig(level=runtime.log_level, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "urllib3", "google", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    exp = load_experiment()
    hypermodel = TinyHyperModel(args.epoch_seconds, args.fail, batch_seconds=args.batch_seconds,
                                space=args.space, hang_after_batches=args.hang_after_batches)
    registry = CollectorRegistry()
    hooks = metrics.role_metrics(registry, exp, runtime.tuner_id)  # exercised; served when asked
    if runtime.metrics_port:
        metrics.serve(registry, runtime.metrics_hosts[0], runtime.metrics_port)
    role = tuning.run_chief if runtime.role == "chief" else tuning.run_worker
    return role(RoleContext.with_hypermodel(exp, runtime, Storage(), hypermodel, metrics=hooks))


if __name__ == "__main__":
    sys.exit(main())
