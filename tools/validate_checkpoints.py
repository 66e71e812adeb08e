#!/usr/bin/env python3
"""Compares candidate weights (epoch checkpoints of a training run, or their means) on VALIDATION data
only, the way the general model's shipped weights were picked (docs/training.md): the realistic
validation images of tools/choose_detection_defaults.py (on the real sources' validation quarters),
N with spots and N/2 without; for each detection threshold, the mean F1 at 3 px and the false detections per
spot-free image (the realistic benchmark's bar is 0.5).

    python3 tools/validate_checkpoints.py e3.safetensors e4.safetensors mean345.safetensors [--n 40]
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from choose_detection_defaults import realistic_validation, realistic_without_spots  # noqa: E402
from deepspot_napari import Model, metrics  # noqa: E402
from deepspot_napari.detect import detect_spots  # noqa: E402
from deepspot_napari.realistic_eval import default_realdata  # noqa: E402

THRESHOLDS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", help="weights files or bundled model names")
    parser.add_argument("--n", type=int, default=40, help="validation images with spots (default 40; half as many without)")
    parser.add_argument("--realdata", default=None, help="realdata folder (default $DEEPSPOT_REALDATA, ../shared/realdata)")
    args = parser.parse_args()
    realdata = args.realdata or default_realdata()
    with_spots = list(realistic_validation(args.n, realdata))
    without = list(realistic_without_spots(args.n // 2, realdata))
    print("| weights | " + " | ".join(f"thr {t:g}: F1 % / false det." for t in THRESHOLDS) + " |")
    print("|---|" + "---|" * len(THRESHOLDS))
    for weights in args.weights:
        model = Model.load(weights)
        enhanced = [model.enhance(s.image) for s in with_spots]
        enhanced_empty = [model.enhance(s.image) for s in without]
        cells = []
        for threshold in THRESHOLDS:
            params = dataclasses.replace(model.detection, threshold=threshold)
            f1 = np.mean([metrics.match_nearest(s.truth, detect_spots(e, params=params).coords).f1
                          for s, e in zip(with_spots, enhanced)])
            false = np.mean([len(detect_spots(e, params=params)) for e in enhanced_empty])
            cells.append(f"{100 * f1:.1f} / {false:.1f}")
        print(f"| {Path(weights).name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
