"""The plots of a published version and of the search report: matplotlib, Agg.

:func:`pyplot` is the one matplotlib set-up (the Agg backend, and a writable config
folder even on a pod's read-only root filesystem); :mod:`skin.publishing.report` draws the search
with it too. ``plot_*`` draw the retrain's learning curves, ROC by split, confusion
matrix with rates and reliability diagram into PNG files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from skin.data.images import CLASSES
from skin.serving.formatting import interval_text
from skin.serving.scoring import roc_curve


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, with a writable ``MPLCONFIGDIR``."""
    config_dir = os.environ.get("MPLCONFIGDIR") or str(Path.home() / ".config" / "matplotlib")
    try:
        Path(config_dir).mkdir(parents=True, exist_ok=True)
        writable = os.access(config_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # a read-only root filesystem in a pod
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="matplotlib-")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: dict[str, list[float]], published_epoch: int | None,
                         path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    names = [n for n in ("loss", "auc", "accuracy") if n in history or f"val_{n}" in history]
    names += [n for n in history if not n.startswith("val_") and n not in names
              and n != "learning_rate"][:max(0, 3 - len(names))]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                ax.plot(epochs, history[key], style, marker="o", ms=3,
                        label="validation" if key.startswith("val_") else "train")
        if published_epoch:
            ax.axvline(published_epoch, color="grey", lw=0.8, ls=":", label="published epoch")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# One look per split on every plot, so validation and test stay apart even where they
# overlap: colour, line style and marker all differ.
SPLIT_STYLE = {
    "validation": dict(color="#1f77b4", ls="-", lw=2.4, marker="o", alpha=0.75),
    "test": dict(color="#d62728", ls="--", lw=1.6, marker="s", alpha=1.0),
}


def _style(split: str) -> dict:
    return SPLIT_STYLE.get(split, dict(color="#2ca02c", ls=":", lw=1.6, marker="^", alpha=1.0))


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], points: dict[str, dict],
             path: Path) -> None:
    """ROC curves by split, with the operating point at the published threshold.

    Validation is a thick solid blue line, test a thin dashed red one with square markers
    drawn on top: one cannot hide the other."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    order = sorted(curves, key=lambda k: k != "validation")  # validation underneath
    for split in order:
        labels, scores = curves[split]
        try:
            fpr, tpr, _ = roc_curve(labels, scores)
        except ValueError:
            continue  # one class only: no curve
        st = _style(split)
        m = points[split]
        auc = m.get("roc_auc")
        ci = interval_text(m, "roc_auc")
        label = split + (f" (AUC {auc:.3f}" + (f", 95 % CI {ci}" if ci else "") + ")"
                         if auc is not None else "")
        ax.plot(fpr, tpr, color=st["color"], ls=st["ls"], lw=st["lw"], alpha=st["alpha"],
                marker=st["marker"], ms=3.5, markevery=max(1, len(fpr) // 12),
                label=label, zorder=2 if split == "validation" else 3)
        if m.get("sensitivity") is not None and m.get("specificity") is not None:
            ax.plot([1 - m["specificity"]], [m["sensitivity"]], marker=st["marker"], ms=10,
                    mfc="none" if split == "validation" else st["color"], mec=st["color"],
                    mew=2, ls="none", zorder=4,
                    label=f"{split} at threshold {m['threshold']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("1 - specificity (benign called malignant)")
    ax.set_ylabel("sensitivity (malignant found)")
    ax.set_title("ROC by split; big markers: the published threshold", fontsize=10)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=7.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(matrix: list[list[int]], split: str, threshold: float,
                          path: Path) -> None:
    """Counts with the row rates: specificity and false-positive rate on the benign row,
    false-negative rate (missed) and sensitivity on the malignant row."""
    plt = pyplot()
    m = np.asarray(matrix)
    rows = m.sum(axis=1, keepdims=True)
    rates = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    names = [["specificity", "false positives"], ["missed (FNR)", "sensitivity"]]
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, f"{count}\n{100 * rates[i, j]:.1f} %\n{names[i][j]}", ha="center",
                va="center", color="white" if rates[i, j] > 0.5 else "black", fontsize=10)
    ax.set_xticks([0, 1], [f"predicted\n{c}" for c in CLASSES])
    ax.set_yticks([0, 1], [f"{c}\n(n={int(rows[k, 0])})" for k, c in enumerate(CLASSES)])
    ax.set_title(f"{split}, threshold {threshold:.3f} (rates per true class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(points: dict[str, dict], path: Path) -> None:
    """Reliability diagram: per probability bin, the share that was malignant against the
    mean predicted probability (on the diagonal: calibrated), and the images per bin."""
    plt = pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.2]})
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfectly calibrated")
    splits = sorted(points.items(), key=lambda kv: kv[0] != "validation")
    for k, (split, m) in enumerate(splits):
        cal = (m.get("calibration") or {}).get("table") or []
        if not cal:
            continue
        st = _style(split)
        ece = m.get("ece")
        ax.plot([b["mean_probability"] for b in cal], [b["fraction_malignant"] for b in cal],
                color=st["color"], ls=st["ls"], lw=st["lw"] * 0.8, marker=st["marker"], ms=6,
                alpha=max(st["alpha"], 0.85),
                label=f"{split} (ECE {ece:.3f}, Brier {m.get('brier'):.3f})"
                if ece is not None and m.get("brier") is not None else split)
        width = 0.8 * (cal[0]["high"] - cal[0]["low"]) / len(splits)  # side by side in a bin
        centres = [(b["low"] + b["high"]) / 2 for b in cal]
        hist.bar([c + (k - (len(splits) - 1) / 2) * width for c in centres],
                 [b["n"] for b in cal], width=width, color=st["color"], alpha=0.8,
                 hatch="" if split == "validation" else "//", edgecolor="white", label=split)
    bins = next(((m.get("calibration") or {}).get("bins") for m in points.values()), 10)
    ax.set_ylabel("fraction malignant")
    ax.set_title(f"Reliability ({bins} equal-width bins of P(malignant))", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7.5)
    hist.set_xlabel("predicted P(malignant)")
    hist.set_ylabel("images per bin")
    hist.grid(alpha=0.3)
    hist.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
