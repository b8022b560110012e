"""Search strategies, recorded once and replayed many times (``make bench-search``).

Running many real searches is far too slow on two cores, so:

``record``  trains a random sample of configurations from the experiment's space (the
            product's random oracle draws them) to the full trial length on the shared
            training images, some of them with 2 seeds (``tuner/seed`` 1 and 2), and writes
            every validation learning curve to a JSON file under ``bench/`` (one config at
            a time, so an interrupted recording resumes). The full recording the issue asks
            for (>= 32 configurations, 12 epochs, 64 px, 2 seeds for >= 8) takes hours::

                skin-slot .venv/bin/python -m bench.search_replay record \\
                    --out bench/search_curves.json --configs 32 --two-seeds 8

``replay``  replays strategies over a curve file many times, each repetition with another
            oracle seed and another noise draw, and reports for each strategy the epochs
            spent and the regret (the best true mean objective minus the picked
            configuration's true mean; "true" = the mean over the recorded seeds). The
            strategies: random, Hyperband, random + median stopping, Hyperband +
            confirmation. The replay drives the PRODUCT's code: ``make_oracle`` (the leased
            random and Hyperband oracles), ``oracle.assign/report/end``, the chief's
            ``MedianStopping`` and ``Confirmation`` and ``build_best`` (what the retrain
            publishes). The space the oracle samples is one ``config`` choice over the
            recorded configurations (a tabular benchmark); two simulated workers train
            one epoch per tick each.

Noise model: a replayed training of configuration c draws one of c's recorded curves
(c's seeds) and shifts it by a constant drawn from N(0, sigma), sigma = the pooled
seed-to-seed standard deviation of the recorded trial scores (so configurations with one
recorded seed vary too). The score of a trial is its best epoch, as the worker reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_CURVES = REPO / "bench" / "search_curves.json"
SMOKE_CURVES = REPO / "bench" / "search_curves_smoke.json"
SHARED_DATA = REPO.parent / "shared" / "datasets" / "skin-cancer-isic" / "train"
STRATEGIES = ("random", "hyperband", "random+median", "hyperband+confirm")


# -- the curve file ----------------------------------------------------------------------------

def load_curves(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    for c in doc["configs"]:
        c["seeds"] = {int(k): [float(v) for v in curve] for k, curve in c["seeds"].items()}
    return doc


def trial_score(curve: list[float], direction: str = "max") -> float:
    return max(curve) if direction == "max" else min(curve)


def seed_sigma(doc: dict) -> float:
    """Pooled seed-to-seed standard deviation of the full-length trial score."""
    direction = doc.get("direction", "max")
    pairs = [[trial_score(curve, direction) for curve in c["seeds"].values()]
             for c in doc["configs"] if len(c["seeds"]) > 1]
    if not pairs:
        return 0.0
    return math.sqrt(statistics.fmean(statistics.variance(p) for p in pairs))


def true_means(doc: dict) -> dict[str, float]:
    direction = doc.get("direction", "max")
    return {c["id"]: statistics.fmean(trial_score(curve, direction)
                                      for curve in c["seeds"].values()) for c in doc["configs"]}


# -- the replay ------------------------------------------------------------------------------

def experiment(strategy: str, doc: dict, seed: int, *, max_trials: int, factor: int,
               start_epoch: int, min_trials: int, top: int, seeds: int):
    from skin.infra.config import parse_experiment

    tuner = "hyperband" if strategy.startswith("hyperband") else "random"
    search = {"tuner": tuner, "objective": doc.get("objective", "val_auc"),
              "max_epochs": int(doc["max_epochs"]), "max_trials": max_trials,
              "hyperband_factor": factor, "max_trial_retries": 0}
    if strategy.endswith("+median"):
        search["early_stopping"] = {"rule": "median", "start_epoch": start_epoch,
                                    "min_trials": min_trials}
    if strategy.endswith("+confirm"):
        search["confirm"] = {"top": top, "seeds": seeds}
    return parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "name": "replay",
                             "data": {"seed": seed}, "search": search}, env={})


class Replay:
    """One search over the recorded curves, run by the product's oracle."""

    def __init__(self, doc: dict, exp, rng: random.Random, sigma: float, workers: int = 2):
        from skin.tuning.oracle import make_oracle

        self.doc, self.exp, self.rng, self.sigma = doc, exp, rng, sigma
        self.configs = {c["id"]: c for c in doc["configs"]}
        self.oracle = make_oracle(exp)
        self.oracle.hyperparameters.Choice("config", sorted(self.configs))
        self.workers = [f"tuner{i}" for i in range(workers)]
        self.curves: dict[str, list[float]] = {}  # trial id -> the curve its training follows
        self.epochs = 0

    def _curve(self, trial) -> list[float]:
        values = trial.hyperparameters.values
        past = values.get("tuner/trial_id")
        if past and past in self.curves:  # Hyperband continues the same training
            return self.curves[past]
        c = self.configs[values["config"]]
        curve = c["seeds"][self.rng.choice(sorted(c["seeds"]))]
        shift = self.rng.gauss(0.0, self.sigma) if self.sigma else 0.0
        return [v + shift for v in curve]

    def run(self) -> dict:
        from keras_tuner.src.engine import metrics_tracking

        o, name = self.oracle, self.exp.search.objective
        direction = o.objective.direction
        held: dict[str, dict] = {}
        for _ in range(100_000):
            if o.state != "running":
                break
            for w in self.workers:
                if w not in held:
                    a = o.assign(w)
                    if a.trial.status != "RUNNING":
                        continue
                    t = a.trial
                    v = t.hyperparameters.values
                    self.curves[t.trial_id] = self._curve(t)
                    held[w] = {"trial": t, "attempt": a.attempt,
                               "epoch": int(v.get("tuner/initial_epoch", 0)),
                               "last": int(v.get("tuner/epochs", self.exp.search.max_epochs)),
                               "seen": []}
            if not held:
                if o.state == "running":  # nothing runs and nothing to hand out: cannot happen
                    raise RuntimeError("the replayed search stalled")
                break
            for w in list(held):
                h = held[w]
                t, e = h["trial"], h["epoch"]
                value = self.curves[t.trial_id][e]
                h["seen"].append((e, value))
                self.epochs += 1
                reply = o.report(t.trial_id, w, h["attempt"], {name: value}, e,
                                 progress_only=True)
                h["epoch"] = e + 1
                if reply.status == "STOPPED" or h["epoch"] >= h["last"]:
                    best_e, best_v = (max if direction == "max" else min)(
                        h["seen"], key=lambda p: p[1])
                    t.metrics = metrics_tracking.MetricsTracker()
                    t.metrics.register(name, direction=direction)
                    t.metrics.update(name, best_v, step=best_e)
                    t.status = "COMPLETED"
                    o.end(t, w, h["attempt"])
                    del held[w]
        from skin.tuning.results import build_best

        best = build_best(o, self.exp)
        stopped = sum(1 for m in o.meta.values() if m.get("stopped"))
        return {"picked": best.hyperparameters["config"] if best else None,
                "epochs": self.epochs, "trials": len(o.trials), "stopped": stopped}


def agreement(picks: list[str], size: int = 3) -> float:
    """The share of consecutive groups of ``size`` picks in which at least two agree."""
    groups = [picks[i:i + size] for i in range(0, len(picks) - size + 1, size)]
    if not groups:
        return 0.0
    return sum(1 for g in groups if max(g.count(p) for p in g) >= 2) / len(groups)


def replay(doc: dict, strategies=STRATEGIES, repeats: int = 100, seed0: int = 1,
           max_trials: int | None = None, factor: int = 3, start_epoch: int | None = None,
           min_trials: int = 3, top: int = 3, seeds: int = 2, triples: int = 0) -> dict:
    """{strategy: {"epochs", "regret", ...}} over ``repeats`` replays of each strategy.

    ``triples``: as many groups of three searches with ONE oracle seed and three noise draws,
    as ``make bench-quality`` repeated three times would run (its search is seeded): the
    share of groups where at least two of the three publish the same configuration."""
    logging.getLogger("skin.tuning").setLevel(logging.WARNING)
    truth = true_means(doc)
    better = max if doc.get("direction", "max") == "max" else min
    best_true = better(truth.values())
    sigma = seed_sigma(doc)
    n = len(doc["configs"])
    max_trials = max_trials or max(2, n // 2)
    start_epoch = start_epoch or max(1, int(doc["max_epochs"]) // 4)
    out = {}
    for strategy in strategies:
        runs = []
        t0 = time.perf_counter()
        for r in range(repeats):
            exp = experiment(strategy, doc, seed0 + r, max_trials=max_trials, factor=factor,
                             start_epoch=start_epoch, min_trials=min_trials, top=top,
                             seeds=seeds)
            res = Replay(doc, exp, random.Random(1000 * (seed0 + r) + 7), sigma).run()
            res["regret"] = abs(best_true - truth[res["picked"]])
            runs.append(res)
        regrets = [x["regret"] for x in runs]
        picks = []
        for g in range(triples):
            exp = experiment(strategy, doc, seed0 + 10_000 + g, max_trials=max_trials,
                             factor=factor, start_epoch=start_epoch, min_trials=min_trials,
                             top=top, seeds=seeds)
            for k in range(3):
                rng = random.Random(1000 * (seed0 + 10_000 + g) + 7 + k)
                picks.append(Replay(doc, exp, rng, sigma).run()["picked"])
        out[strategy] = {
            "repeats": repeats,
            "epochs_mean": statistics.fmean(x["epochs"] for x in runs),
            "trials_mean": statistics.fmean(x["trials"] for x in runs),
            "stopped_mean": statistics.fmean(x["stopped"] for x in runs),
            "regret_mean": statistics.fmean(regrets),
            "regret_se": statistics.stdev(regrets) / math.sqrt(len(regrets)) if len(regrets) > 1
            else 0.0,
            "regret_zero_share": sum(1 for x in regrets if x == 0) / len(regrets),
            "triples": triples,
            "same_pick_2_of_3": agreement(picks) if picks else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return {"configs": n, "max_epochs": doc["max_epochs"], "sigma": sigma,
            "best_true": best_true, "settings": {"max_trials": max_trials, "factor": factor,
                                                 "start_epoch": start_epoch,
                                                 "min_trials": min_trials, "top": top,
                                                 "seeds": seeds},
            "strategies": out}


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(report: dict) -> str:
    rows = ["| strategy | epochs (mean) | vs random | trials | stopped early | regret (mean ± se) "
            "| regret 0 | same pick in >= 2 of 3 |", "|---|---|---|---|---|---|---|---|"]
    base = report["strategies"].get("random", {}).get("epochs_mean")
    for name, s in report["strategies"].items():
        ratio = f"{s['epochs_mean'] / base:.2f}x" if base else "-"
        rows.append(f"| {name} | {s['epochs_mean']:.1f} | {ratio} | {s['trials_mean']:.1f} | "
                    f"{s['stopped_mean']:.1f} | {s['regret_mean']:.4f} ± {s['regret_se']:.4f} | "
                    f"{s['regret_zero_share']:.0%} | {_share(s.get('same_pick_2_of_3'))} |")
    return "\n".join(rows)


# -- the recording -----------------------------------------------------------------------------

def _subset(source: Path, per_class: int, out: Path) -> Path:
    """A folder of symlinks to ``per_class`` images of each class, spread over the numbering."""
    for label in ("benign", "malignant"):
        files = sorted((source / label).glob("*.jpg"))
        step = max(1, len(files) // per_class)
        (out / label).mkdir(parents=True, exist_ok=True)
        for f in files[::step][:per_class]:
            link = out / label / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return out


def record(args) -> int:
    import keras
    import keras_tuner  # noqa: F401

    from skin.data import dataset as skin_data
    from skin.infra.config import load_experiment
    from skin.infra.emulator import Emulator
    from skin.infra.storage import Storage
    from skin.model.hypermodel import SEED_KEY, SkinHyperModel
    from skin.model.space import hyperparameters_from_values, space_of
    from skin.staging.stage import stage
    from skin.tuning.chief import populate_space
    from skin.tuning.oracle import make_oracle

    out = Path(args.out).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.data).resolve()
    if args.images_per_class:
        source = _subset(source, args.images_per_class, work / "subset")
    exp = load_experiment(args.config, env={})
    exp = dataclasses.replace(
        exp, name="bench-search-record",
        data=dataclasses.replace(exp.data, source=str(source),
                                 image_size=args.image_size or exp.data.image_size),
        search=dataclasses.replace(exp.search, tuner="random", max_trials=args.configs,
                                   max_epochs=args.epochs or exp.search.max_epochs,
                                   early_stopping=dataclasses.replace(
                                       exp.search.early_stopping, rule="none"),
                                   confirm=dataclasses.replace(exp.search.confirm, top=0)))
    epochs = exp.search.max_epochs
    doc = {"kind": args.kind, "objective": exp.search.objective,
           "direction": "min" if exp.search.objective.endswith("loss") else "max",
           "max_epochs": epochs, "image_size": exp.data.image_size, "data": str(args.data),
           "images_per_class": args.images_per_class or None, "split_seed": exp.data.seed,
           "command": " ".join(sys.argv), "machine": f"{os.cpu_count()} cores",
           "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "space": space_of(exp), "configs": []}
    if out.exists():  # resume: keep what was recorded with the same settings
        old = json.loads(out.read_text())
        if old.get("max_epochs") == epochs and old.get("image_size") == exp.data.image_size:
            doc["configs"] = old["configs"]
            doc["started"] = old.get("started", doc["started"])
    oracle = make_oracle(exp)
    hm = SkinHyperModel(exp)
    populate_space(oracle, hm)
    drawn = [oracle.assign(f"rec{i}").trial.hyperparameters.values for i in range(args.configs)]
    with Emulator(bucket=exp.storage.bucket, data_dir=str(work / "bucket")) as emu:
        os.environ.update(emu.environ())
        storage = Storage()
        stage(exp, storage, work_dir=work / "stage")
        data_dir = skin_data.sync_data(storage, exp.data_uri, work / "data")
        for i, values in enumerate(drawn):
            cid = f"c{i:02d}"
            entry = next((c for c in doc["configs"] if c["id"] == cid), None)
            if entry is None:
                entry = {"id": cid, "hyperparameters": {k: v for k, v in values.items()},
                         "seeds": {}, "seconds": {}}
                doc["configs"].append(entry)
            for seed in ([1, 2] if i < args.two_seeds else [1]):
                if str(seed) in entry["seeds"] or seed in entry["seeds"]:
                    continue
                hp = hyperparameters_from_values({**values, SEED_KEY: seed})
                keras.backend.clear_session()
                t0 = time.monotonic()
                model = hm.build(hp)
                hist = hm.fit(hp, model, data_dir=str(data_dir), epochs=epochs)
                entry["seeds"][str(seed)] = [float(v) for v in hist.history[exp.search.objective]]
                entry["seconds"][str(seed)] = round(time.monotonic() - t0, 1)
                out.write_text(json.dumps(doc, indent=1, default=str))
                print(f"{cid} seed {seed}: best {exp.search.objective} "
                      f"{max(entry['seeds'][str(seed)]):.4f} in {entry['seconds'][str(seed)]} s",
                      flush=True)
    doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("record", help="train configurations and store their learning curves")
    rec.add_argument("--out", default=str(DEFAULT_CURVES))
    rec.add_argument("--config", default=str(REPO / "skin" / "experiments" / "default.yaml"))
    rec.add_argument("--data", default=str(SHARED_DATA))
    rec.add_argument("--configs", type=int, default=32)
    rec.add_argument("--two-seeds", type=int, default=8,
                     help="the first N configurations are trained with a second seed")
    rec.add_argument("--epochs", type=int, default=0, help="trial length (0: the experiment's)")
    rec.add_argument("--image-size", type=int, default=0, help="0: the experiment's")
    rec.add_argument("--images-per-class", type=int, default=0,
                     help="train on a subset (a smoke recording); 0: every image")
    rec.add_argument("--kind", default="full", choices=("full", "smoke"))
    rec.add_argument("--work", default="/tmp/skin-bench-search")
    rep = sub.add_parser("replay", help="replay the strategies over a curve file")
    rep.add_argument("--curves", default="")
    rep.add_argument("--repeats", type=int, default=100)
    rep.add_argument("--max-trials", type=int, default=0)
    rep.add_argument("--factor", type=int, default=3)
    rep.add_argument("--start-epoch", type=int, default=0)
    rep.add_argument("--min-trials", type=int, default=3)
    rep.add_argument("--top", type=int, default=3)
    rep.add_argument("--seeds", type=int, default=2)
    rep.add_argument("--triples", type=int, default=50,
                     help="groups of 3 searches with one oracle seed (pick agreement)")
    rep.add_argument("--json", default="", help="also write the report here")
    args = ap.parse_args(argv)
    if args.mode == "record":
        return record(args)
    curves = Path(args.curves) if args.curves else (
        DEFAULT_CURVES if DEFAULT_CURVES.exists() else SMOKE_CURVES)
    doc = load_curves(curves)
    t0 = time.perf_counter()
    report = replay(doc, repeats=args.repeats, max_trials=args.max_trials or None,
                    factor=args.factor, start_epoch=args.start_epoch or None,
                    min_trials=args.min_trials, top=args.top, seeds=args.seeds,
                    triples=args.triples)
    # a recording still under way (or interrupted) has no "finished" time: say so
    kind = doc.get("kind") if doc.get("finished") else f"UNFINISHED {doc.get('kind')}"
    report["curves"] = {"file": str(curves), "kind": doc.get("kind"),
                        "finished": doc.get("finished"), "image_size": doc.get("image_size")}
    print(f"curves: {curves} ({kind} recording: {report['configs']} configurations, "
          f"{report['max_epochs']} epochs, seed-to-seed sigma {report['sigma']:.4f}); "
          f"{args.repeats} replays per strategy, {args.triples} triples with one seed; "
          f"settings {report['settings']}")
    print(table(report))
    print(f"replay took {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
