"""Writes weights/deepspot_general.safetensors from the training runs of tools/train_general.sh: the last
run's best weights (inference tensors only), with metadata saying what they are and how they were made:
the training target, the detection defaults chosen on validation data (--detection, JSON of
DetectionParams fields, from tools/choose_detection_defaults.py), and each run's recipe, epochs, steps,
images and wall time (from its state.json). Several runs: each one fine-tuned the previous one's best
weights (train_general.sh's START_WEIGHTS), the first one the published weights.

    python3 tools/ship_general_model.py runs/general/train runs/general2/train \
        --notes "recipe v1 (commit 13bec46)" "recipe v2 (docs/simulator.md)" --detection '{"threshold": 0.6}'
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspot_napari import Model  # noqa: E402
from deepspot_napari.model import detection_from_metadata  # noqa: E402
from deepspot_napari.safetensors_io import read_metadata  # noqa: E402
from deepspot_napari.train import _save_weights  # noqa: E402


def _stage(run: Path, note: str) -> dict:
    """One training run's summary, up to the epoch whose weights it kept (best.safetensors)."""
    state = json.loads((run / "state.json").read_text())
    history, settings = state["history"], state["settings"]
    epoch = int(read_metadata(run / "best.safetensors")["epoch"])
    steps_per_epoch = history["steps"] // len(history["epoch"])
    return dict(recipe=note, best_epoch=epoch, epochs_run=len(history["epoch"]), steps=epoch * steps_per_epoch,
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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "weights" /
                        "deepspot_general.safetensors")
    args = parser.parse_args()
    if len(args.notes) != len(args.runs):
        parser.error(f"give one note per run: {len(args.runs)} runs, {len(args.notes)} notes")
    detection_from_metadata({"detection": args.detection})  # refuses what is not DetectionParams
    stages = [_stage(run, note) for run, note in zip(args.runs, args.notes)]
    best = args.runs[-1] / "best.safetensors"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    _save_weights(Model.load(best).make_trainer(), args.out, False, {
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
