"""Does an ensemble of the search's best trials, or test-time augmentation, beat one model?

    .venv/bin/python -m bench.quality_members --out runs/bench-quality [--top 5]

Reads what a `make bench-quality OUT=dir` run left in ``dir/bucket`` (staged data,
``tuner/result.json``, each trial's best checkpoint), with no training: the top
``--top`` completed trials with distinct hyperparameters (``skin.publishing.training.top_trials``)
are loaded from their checkpoints and combined with ``skin.model.inference.inference_model``,
the function the retrain publishes with. For k = 1..top members, with and without
the 8-view TTA, the threshold is chosen on validation (``retrain.target_sensitivity``)
and the figures are reported on the held-out test split; the run's published model
(``dir/model``) is scored the same way, as published and with TTA. The trial checkpoints are
shorter trainings than the retrain (at most ``search.max_epochs`` epochs), so this
answers "does combining help, and by how much", not what the retrain reaches.
Prints one Markdown table (for BENCHMARKS.md) and writes ``dir/members.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the OUT of an earlier make bench-quality")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()

    from skin.infra.config import load_experiment
    from skin.infra.emulator import Emulator
    from skin.infra.storage import Storage, join
    from skin.model.hypermodel import SkinHyperModel
    from skin.model.inference import inference_model
    from skin.model.space import hyperparameters_from_values
    from skin.publishing.training import split_predictions, top_trials
    from skin.serving.scoring import choose_threshold, classification_metrics
    from skin.tuning.checkpoints import checkpoint_uri

    exp = load_experiment(out / "experiment.yaml", env={})
    with Emulator(bucket=exp.storage.bucket, data_dir=str(out / "bucket")) as emu:
        os.environ.update(emu.environ())
        storage = Storage()
        from skin.data import dataset as skin_data

        data_dir = Path(skin_data.sync_data(storage, exp.data_uri, out / "bench-work" / "data"))
        result = storage.read_json(join(exp.tuner_uri, "result.json"))
        best = storage.read_json(join(exp.tuner_uri, "best_hyperparameters.json"))
        picked = top_trials(result, args.top, best=best, objective=exp.search.objective)
        size, target = exp.data.image_size, exp.retrain.target_sensitivity
        models = []
        for t in picked:
            local = out / "bench-work" / "members" / str(t["trial_id"])
            local.mkdir(parents=True, exist_ok=True)
            weights = local / "checkpoint.weights.h5"
            storage.download_file(checkpoint_uri(storage, exp.trials_uri, t["trial_id"]),
                                  weights)
            values = {k: v for k, v in t["hyperparameters"].items()}
            model = SkinHyperModel(exp).build(hyperparameters_from_values(values))
            model.load_weights(str(weights))
            models.append(model)

    rows = []

    def score(members: list, tta: bool, label, trials: list) -> dict:
        """Threshold on validation; test figures at it and at 0.5."""
        model = inference_model(members, tta=tta)
        vy, vp = split_predictions(model, data_dir, "validation", size)
        ty, tp = split_predictions(model, data_dir, "test", size)
        thr = choose_threshold(vy, vp, target)
        row = {"members": label, "tta": tta, "threshold": thr, "trials": trials,
               "validation": classification_metrics(vy, vp, thr),
               "test": classification_metrics(ty, tp, thr),
               "test_at_0.5": classification_metrics(ty, tp, 0.5)}
        rows.append(row)
        return row

    for k in range(1, len(models) + 1):
        for tta in (False, True):
            row = score(models[:k], tta, k, [t["trial_id"] for t in picked[:k]])
            val, test = row["validation"], row["test"]
            print(json.dumps({"members": k, "tta": tta, "val_auc": val["roc_auc"],
                              "test_auc": test["roc_auc"], "test_acc": test["accuracy"],
                              "test_sens": test["sensitivity"]}), flush=True)
    # The run's published model (its 60-epoch retrain), as published and with the 8-view TTA.
    from skin.serving.contract import load_published

    published, _ = load_published(out / "model")
    for tta in (False, True):
        score([published], tta, "published", ["model/"])
    (out / "members.json").write_text(json.dumps({"trials": picked, "rows": rows}, indent=2,
                                                 default=str))
    print()
    print("| members (trials) | TTA | val AUC | test AUC | test acc | sensitivity | specificity "
          "| test acc at 0.5 | confusion [[tn, fp], [fn, tp]] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v, t, h = r["validation"], r["test"], r["test_at_0.5"]
        print(f"| {r['members']} ({', '.join(r['trials'])}) | {'8 views' if r['tta'] else '-'} "
              f"| {v['roc_auc']:.3f} | {t['roc_auc']:.3f} | {t['accuracy']:.3f} "
              f"| {t['sensitivity']:.3f} | {t['specificity']:.3f} | {h['accuracy']:.3f} "
              f"| {t['confusion_matrix']} |")
    best_val = max((r for r in rows if r["members"] != "published"),
                   key=lambda r: r["validation"]["roc_auc"])
    print(f"\nchosen on validation AUC: {best_val['members']} member(s), "
          f"TTA {'on' if best_val['tta'] else 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
