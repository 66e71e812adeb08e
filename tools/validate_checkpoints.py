#!/usr/bin/env python3
"""Compares candidate weights (epoch checkpoints of a training run, or their means) on VALIDATION data
only, the way the general model's shipped weights were picked (docs/training.md): realistic images on
the real sources' validation quarters (the keys of tools/choose_detection_defaults.py), N with spots
and N/2 without; for each detection threshold, the mean F1 at 3 px and the false detections per
spot-free image (the realistic benchmark's bar is 0.5).

    python3 tools/validate_checkpoints.py e3.safetensors e4.safetensors mean345.safetensors [--n 40]
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspot_napari import Model, metrics  # noqa: E402
from deepspot_napari.detect import detect_spots  # noqa: E402
from deepspot_napari.evaluate import VALIDATION_SEED  # noqa: E402
from deepspot_napari.realistic import realistic_image  # noqa: E402
from deepspot_napari.realistic_eval import default_realdata, real_background_sources  # noqa: E402

THRESHOLDS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", help="weights files or bundled model names")
    parser.add_argument("--n", type=int, default=40, help="validation images with spots (default 40; half as many without)")
    parser.add_argument("--realdata", default=None, help="realdata folder (default $DEEPSPOT_REALDATA, ../shared/realdata)")
    args = parser.parse_args()
    sources, why = real_background_sources(args.realdata or default_realdata(), "validation")
    if why:
        print(f"realistic validation images: {why}", file=sys.stderr)
    with_spots = [realistic_image(np.random.default_rng(np.random.SeedSequence([VALIDATION_SEED, 0x5EA1, 9, k])), 256,
                                  sources=sources, n_spots=(10, 150)) for k in range(args.n)]
    without = [realistic_image(np.random.default_rng(np.random.SeedSequence([VALIDATION_SEED, 0x5EA1, 10, k])), 256,
                               sources=sources, n_spots=0) for k in range(args.n // 2)]
    print("| weights | " + " | ".join(f"thr {t:g}: F1 % / false det." for t in THRESHOLDS) + " |")
    print("|---|" + "---|" * len(THRESHOLDS))
    for weights in args.weights:
        model = Model.load(weights)
        enhanced = [model.enhance(s.image) for s in with_spots]
        enhanced_empty = [model.enhance(s.image) for s in without]
        cells = []
        for threshold in THRESHOLDS:
            params = dataclasses.replace(model.detection, threshold=threshold)
            f1 = np.mean([metrics.match_nearest(s.spots, detect_spots(e, params=params).coords).f1
                          for s, e in zip(with_spots, enhanced)])
            false = np.mean([len(detect_spots(e, params=params)) for e in enhanced_empty])
            cells.append(f"{100 * f1:.1f} / {false:.1f}")
        print(f"| {Path(weights).name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
