"""Writes weights/deepspot_general.safetensors from a training run of tools/train_general.sh: the run's
best weights (inference tensors only), with metadata saying what they are and how they were made:
the training target, the detection defaults chosen on validation data (--detection, JSON of
DetectionParams fields, from tools/choose_detection_defaults.py), and the run's recipe, epochs, steps,
images and wall time (from its state.json).

    python3 tools/ship_general_model.py /work/runs/general/train --detection '{"threshold": 0.6}'
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="the training run folder (state.json, best.safetensors)")
    parser.add_argument("--detection", required=True, help="JSON of the detection defaults chosen on validation data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "weights" /
                        "deepspot_general.safetensors")
    args = parser.parse_args()
    state = json.loads((args.run / "state.json").read_text())
    best = args.run / "best.safetensors"
    meta = read_metadata(best)
    detection_from_metadata({"detection": args.detection})  # refuses what is not DetectionParams
    history, settings = state["history"], state["settings"]
    epoch = int(meta["epoch"])
    steps_per_epoch = history["steps"] // len(history["epoch"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    _save_weights(Model.load(best).make_trainer(), args.out, False, {
        "name": "general",
        "target_background": meta["target_background"], "detection": args.detection,
        "training": json.dumps(dict(
            recipe="tools/train_general.sh: realistic recipe 6000 + hybrid/ds_var/code 600 each, 128 px crops; "
                   "validation realistic 400 + hybrid 100", start="deepspot_hybrid.safetensors (published)",
            best_epoch=epoch, epochs_run=len(history["epoch"]), steps=epoch * steps_per_epoch,
            crops_seen=epoch * steps_per_epoch * settings["batch_size"], batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"], batch_norm=settings["batch_norm"],
            val_loss=history["val_loss"][epoch - 1], val_f1=history["val_f1"][epoch - 1],
            wall_seconds=round(sum(history["seconds"][:epoch])), code=commit)),
        "licence": "MIT, fine-tuned from the published DeepSpot weights (weights/LICENSE-deepspot-weights.txt)"})
    print(f"wrote {args.out} (epoch {epoch} of {len(history['epoch'])}, {epoch * steps_per_epoch} steps)")


if __name__ == "__main__":
    main()
