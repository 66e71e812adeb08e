"""The annotate-and-retrain protocol (`deepspot evaluate --finetune`): does fine-tuning with the
defaults make the rest of an image better?

Each annotated image is cut in two halves across its longer side. For each direction (train on
the first half and score the second, then the reverse) and each seed: the model before
fine-tuning, Big-FISH's automatic LoG and the fine-tuned model (Model.fit with its defaults, from
a fresh copy of the starting weights) are scored on the other half with the fixed detector (F1,
precision, recall at 3 px, the paper's nearest match; and the F1 at the best threshold for that
half, which no user could choose). Every epoch's checkpoint is also scored on the other half, so
the report shows how far the weights the defaults keep are from the best epoch, and the curves.
"""
from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .detect import detect_spots
from .io import write_bytes
from .metrics import match_nearest

THRESHOLDS = np.round(np.arange(0.30, 0.96, 0.05), 2)
REPORT_FILES = ("finetune.md", "finetune.csv", "finetune_curves.png")


@dataclass
class Run:
    image: str
    trained_on: str
    scored_on: str
    seed: int
    before: dict
    bigfish: dict | None
    after: dict
    epochs: list[int] = field(default_factory=list)
    epoch_f1: list[float] = field(default_factory=list)      # scored half, each epoch's checkpoint
    val_f1: list[float] = field(default_factory=list)        # the held-out strip of the trained half
    best_epoch: int | None = None                             # the epoch the defaults kept
    train_seconds: float = 0.0
    steps: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def best_epoch_f1(self) -> float:
        return max(self.epoch_f1) if self.epoch_f1 else math.nan


def halves(image: np.ndarray, truth: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The two halves across the longer side: (name, pixels, points in the half's coordinates)."""
    axis = int(image.shape[1] >= image.shape[0])
    mid = image.shape[axis] // 2
    names = ("left", "right") if axis == 1 else ("top", "bottom")
    out = []
    for name, start, stop in ((names[0], 0, mid), (names[1], mid, image.shape[axis])):
        index = [slice(None), slice(None)]
        index[axis] = slice(start, stop)
        keep = (np.rint(truth[:, axis]) >= start) & (np.rint(truth[:, axis]) < stop)
        shift = np.zeros(2)
        shift[axis] = start
        out.append((name, image[tuple(index)], truth[keep] - shift))
    return out


def score(truth: np.ndarray, enhanced: np.ndarray) -> dict:
    """Default-detector counts and the best-threshold F1 of one enhanced half."""
    spots = detect_spots(enhanced)
    counts = match_nearest(truth, spots.coords)
    by_threshold = [(match_nearest(truth, detect_spots(enhanced, threshold=float(t)).coords).f1, float(t))
                    for t in THRESHOLDS]
    best_f1, best_threshold = max(by_threshold)
    return dict(detections=len(spots), precision=counts.precision, recall=counts.recall, f1=counts.f1,
                best_f1=best_f1, best_threshold=best_threshold)


def run_protocol(samples: Sequence, weights=None, seeds: Sequence[int] = (0,), device: str = "cpu",
                 bigfish: bool = True, log: Callable[[str], None] = print, **fit_options) -> list[Run]:
    """Runs the protocol on annotated samples (evaluate.Sample: name, image, truth) starting from
    `weights` (None: the bundled model); fit_options override Model.fit's defaults."""
    from . import evaluate
    from .model import Model

    use_bigfish = bigfish and evaluate.bigfish_available()
    runs = []
    for sample in samples:
        parts = halves(np.asarray(sample.image), np.asarray(sample.truth, float).reshape(-1, 2))
        for (train_name, train_image, train_truth), (score_name, score_image, score_truth) in (
                (parts[0], parts[1]), (parts[1], parts[0])):
            start = Model.load(weights, device=device)
            before = score(score_truth, start.enhance(score_image))
            big = None
            if use_bigfish:
                found = evaluate.bigfish_method().detect(evaluate.Sample(score_name, score_image, score_truth), None)
                counts = match_nearest(score_truth, found)
                big = dict(detections=len(found), precision=counts.precision, recall=counts.recall, f1=counts.f1)
            for seed in seeds:
                model = Model.load(weights, device=device)
                run = Run(sample.name, f"{train_name} ({len(train_truth)} spots)",
                          f"{score_name} ({len(score_truth)} spots)", int(seed), before, big, {})
                with tempfile.TemporaryDirectory(prefix="deepspot-finetune-") as tmp:
                    def on_epoch(record, tmp=Path(tmp), run=run):
                        checkpoint = sorted(tmp.glob("checkpoint-*.safetensors"))[-1]
                        enhanced = Model.load(checkpoint, device=device).enhance(score_image)
                        run.epochs.append(int(record["epoch"]))
                        run.epoch_f1.append(match_nearest(score_truth, detect_spots(enhanced).coords).f1)
                        run.val_f1.append(float(record["val_f1"]))
                    history = model.fit([train_image], [train_truth], seed=int(seed), checkpoint_dir=tmp,
                                        resume=False, on_epoch=on_epoch, **fit_options)
                    # the per-epoch scoring is not training time
                    run.train_seconds = float(np.sum(history.seconds))
                run.after = score(score_truth, model.enhance(score_image))
                run.best_epoch, run.steps, run.warnings = history.best_epoch, history.steps, list(history.warnings)
                runs.append(run)
                log(f"{sample.name}: trained on {run.trained_on}, scored on {run.scored_on}, seed {seed}: F1 "
                    f"{before['f1']:.3f} -> {run.after['f1']:.3f} (best epoch {run.best_epoch_f1:.3f}), "
                    f"{run.train_seconds:.0f} s")
    return runs


def markdown(runs: Sequence[Run], preamble: Sequence[str] = ()) -> str:
    lines = ["# Fine-tuning protocol: train on one half, score the other", "", *preamble, ""]
    lines += ["| image | trained on | scored on | seed | F1 before | Big-FISH F1 | F1 after | gain | "
              "best epoch's F1 | kept epoch (of run) | P / R after | best-threshold F1 before -> after | "
              "training s | steps |", "|" + "---|" * 14]
    for r in runs:
        big = f"{r.bigfish['f1']:.3f}" if r.bigfish else "-"
        lines.append(f"| {r.image} | {r.trained_on} | {r.scored_on} | {r.seed} | {r.before['f1']:.3f} | {big} | "
                     f"**{r.after['f1']:.3f}** | {r.after['f1'] - r.before['f1']:+.3f} | {r.best_epoch_f1:.3f} | "
                     f"{r.best_epoch} ({len(r.epochs)}) | {r.after['precision']:.2f} / {r.after['recall']:.2f} | "
                     f"{r.before['best_f1']:.3f} @ {r.before['best_threshold']:.2f} -> {r.after['best_f1']:.3f} @ "
                     f"{r.after['best_threshold']:.2f} | {r.train_seconds:.0f} | {r.steps} |")
    if runs:
        gains = [r.after["f1"] - r.before["f1"] for r in runs]
        gaps = [r.best_epoch_f1 - r.after["f1"] for r in runs]
        lines += ["", f"Mean gain {np.mean(gains):+.3f} (min {min(gains):+.3f}); kept weights below the best epoch by "
                      f"{np.mean(gaps):.3f} on average (worst {max(gaps):.3f}); training "
                      f"{np.mean([r.train_seconds for r in runs]):.0f} s per run on average."]
    warned = [w for r in runs for w in r.warnings]
    if warned:
        lines += ["", "Warnings before training:", *[f"* {w}" for w in dict.fromkeys(warned)]]
    return "\n".join(lines) + "\n"


def csv_rows(runs: Sequence[Run]) -> list[dict]:
    rows = []
    for r in runs:
        row = dict(image=r.image, trained_on=r.trained_on, scored_on=r.scored_on, seed=r.seed,
                   best_epoch=r.best_epoch, epochs=len(r.epochs), steps=r.steps, train_seconds=round(r.train_seconds, 1),
                   best_epoch_f1=r.best_epoch_f1, bigfish_f1=r.bigfish["f1"] if r.bigfish else "")
        row.update({f"before_{k}": v for k, v in r.before.items()})
        row.update({f"after_{k}": v for k, v in r.after.items()})
        rows.append(row)
    return rows


def curves_png(runs: Sequence[Run], path: Path) -> None:
    """Scored-half F1 (solid) and validation-strip F1 (dashed) per epoch, one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for k, r in enumerate(runs):
        colour = f"C{k % 10}"
        ax.plot(r.epochs, r.epoch_f1, "-", color=colour, label=f"{r.scored_on.split()[0]} (seed {r.seed})")
        ax.plot(r.epochs, r.val_f1, "--", color=colour, alpha=0.5)
        if r.best_epoch in r.epochs:
            ax.plot([r.best_epoch], [r.epoch_f1[r.epochs.index(r.best_epoch)]], "o", color=colour)
        ax.axhline(r.before["f1"], color=colour, lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("F1 @ 3 px, fixed detector")
    ax.set_title("solid: scored half; dashed: validation strip; dot: epoch kept; dotted: before", fontsize=9)
    ax.legend(fontsize=7, loc="lower right", title="scored on", title_fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
