"""Writes weights/deepspot_general.safetensors from the training runs of tools/train_general.sh: the last
run's best weights, or with --average the mean of some of its epochs' weights (inference tensors only;
the batch norms were frozen, so every checkpoint holds the same statistics and the mean is a network
of the same kind: averaging the weights of consecutive epochs smooths the epoch-to-epoch swing
between a more and a less generous model that the validation scores show), with metadata saying what they are and how they were made:
the training target, the detection defaults chosen on validation data (--detection, JSON of
DetectionParams fields, from tools/choose_detection_defaults.py), and each run's recipe, epochs, steps,
images and wall time (from its state.json). Several runs: each one fine-tuned the previous one's best
weights (train_general.sh's START_WEIGHTS), the first one the published weights.

    python3 tools/ship_general_model.py RUN/train --notes "realistic recipe v2 (docs/simulator.md)" \
        --average e3.safetensors e4.safetensors e5.safetensors --detection '{"threshold": 0.8}'

(the trainer keeps only the last epoch's checkpoint: copy each one out of RUN/train as its epoch ends.)
"""
import argparse
import json

import numpy as np
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspot_napari import Model  # noqa: E402
from deepspot_napari.model import detection_from_metadata  # noqa: E402
from deepspot_napari.safetensors_io import read_metadata  # noqa: E402
from deepspot_napari.train import _save_weights  # noqa: E402


def _stage(run: Path, note: str, averaged: list[int] | None = None) -> dict:
    """One training run's summary, up to the epoch whose weights it kept (best.safetensors), or up to
    the last of the averaged epochs."""
    state = json.loads((run / "state.json").read_text())
    history, settings = state["history"], state["settings"]
    epoch = averaged[-1] if averaged else int(read_metadata(run / "best.safetensors")["epoch"])
    steps_per_epoch = history["steps"] // len(history["epoch"])
    return dict(recipe=note, best_epoch=epoch, averaged_epochs=averaged, epochs_run=len(history["epoch"]),
                steps=epoch * steps_per_epoch,
                crops_seen=epoch * steps_per_epoch * settings["batch_size"], batch_size=settings["batch_size"],
                learning_rate=settings["learning_rate"], batch_norm=settings["batch_norm"],
                val_loss=history["val_loss"][epoch - 1], val_f1=history["val_f1"][epoch - 1],
                wall_seconds=round(sum(history["seconds"][:epoch])))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=Path, nargs="+",
                        help="the training run folders (state.json, best.safetensors), first to last")
    parser.add_argument("--notes", nargs="+", required=True, help="each run's recipe, in a few words")
    parser.add_argument("--detection", required=True, help="JSON of the detection defaults chosen on validation data")
    parser.add_argument("--average", type=Path, nargs="+", metavar="CHECKPOINT",
                        help="ship the mean of these epoch checkpoints of the last run instead of its best.safetensors")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "weights" /
                        "deepspot_general.safetensors")
    args = parser.parse_args()
    if len(args.notes) != len(args.runs):
        parser.error(f"give one note per run: {len(args.runs)} runs, {len(args.notes)} notes")
    detection_from_metadata({"detection": args.detection})  # refuses what is not DetectionParams
    last = args.runs[-1]
    averaged = None
    if args.average:
        averaged = sorted(int(read_metadata(c)["epoch"]) for c in args.average)
    stages = [_stage(run, note) for run, note in zip(args.runs[:-1], args.notes[:-1])]
    stages.append(_stage(last, args.notes[-1], averaged))
    best = last / "best.safetensors"
    trainer = Model.load(best).make_trainer()
    if averaged:
        checkpoints = [Model.load(c).make_trainer() for c in args.average]
        for name in trainer.names:
            trainer.set(name, np.mean([c.get(name).astype(np.float64) for c in checkpoints], axis=0).astype(np.float32))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    _save_weights(trainer, args.out, False, {
        "name": "general",
        "target_background": read_metadata(best)["target_background"], "detection": args.detection,
        "training": json.dumps(dict(
            data="tools/train_general.sh: realistic recipe 6000 + hybrid/ds_var/code 600 each, 128 px crops; "
                 "validation realistic 400 + hybrid 100", start="deepspot_hybrid.safetensors (published)",
            stages=stages, steps=sum(s["steps"] for s in stages),
            wall_seconds=sum(s["wall_seconds"] for s in stages), code=commit)),
        "licence": "MIT, fine-tuned from the published DeepSpot weights (weights/LICENSE-deepspot-weights.txt)"})
    print(f"wrote {args.out} ({len(stages)} runs, {sum(s['steps'] for s in stages)} steps)")


if __name__ == "__main__":
    main()
