#!/usr/bin/env python3
"""The bf16 accuracy gate (issue 13, docs/benchmarks.md): the same test images enhanced by the same weights
in float32 and in bf16 (`precision="bf16"`), then detected with the model's defaults; per family, the
largest and mean |bf16 - float32| of the enhanced maps and the mean F1 and F1 integral (0-3 px) of each.
The gate: every family's F1 and F1 integral within 0.3 points of float32.

    python3 tools/bf16_gate.py [--weights general] [--n-images 40] [--realdata DIR] [--markdown out.md]

Families: the paper's regenerated DS_fixed and DS_var sets (test seed), the realistic test family (SNR bins,
densities) and its spot-free images (false detections per image), the authors' 50 images and the real
expert-annotated image (from the realdata folder; skipped with the reason when absent).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspot_napari import Model, metrics  # noqa: E402
from deepspot_napari.evaluate import file_dataset, folder_dataset, simulated_datasets  # noqa: E402
from deepspot_napari.realistic_eval import (default_realdata, empty_datasets, real_background_sources,  # noqa: E402
                                            realistic_datasets)


def families(n_images: int, realdata: Path):
    sets = simulated_datasets(n_images=n_images)
    yield "DS_fixed", [d for d in sets if d.name.startswith("DS_fixed")]
    yield "DS_var", [d for d in sets if d.name.startswith("DS_var")]
    sources, why = real_background_sources(realdata, "test")
    if why:
        print(f"realistic family: {why}", file=sys.stderr)
    yield "realistic", realistic_datasets(sources)
    yield "realistic, no spots", empty_datasets(sources)
    authors = realdata / "deepspot_authors_sim"
    if authors.is_dir():
        yield "authors' 50 images", [folder_dataset(authors / "original", authors / "csv", name="authors_sim")]
    else:
        print(f"authors' images: {authors} is missing; skipped", file=sys.stderr)
    insta = realdata / "annotated" / "insta_smfish_293t_tfrc"
    if insta.is_dir():
        yield "real insta image", [file_dataset(insta / "image.tif", insta / "spots.csv", name="insta")]
    else:
        print(f"real image: {insta} is missing; skipped", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="weights (default: the default bundled model)")
    parser.add_argument("--n-images", type=int, default=40, help="images per DS set (default 40, the paper's)")
    parser.add_argument("--realdata", type=Path, default=None, help="default $DEEPSPOT_REALDATA, ../shared/realdata")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    realdata = args.realdata or default_realdata()
    exact = Model.load(args.weights, device="cpu", precision="float32")
    fast = Model.load(args.weights, device="cpu", precision="bf16")
    rows, start = [], time.perf_counter()
    for family, datasets in families(args.n_images, realdata):
        diffs, f1, integral, false = {"max": 0.0, "sum": 0.0, "n": 0}, ([], []), ([], []), ([], [])
        for dataset in datasets:
            for sample in dataset:
                a, b = exact.enhance(sample.image), fast.enhance(sample.image)
                d = np.abs(a - b)
                diffs["max"] = max(diffs["max"], float(d.max()))
                diffs["sum"] += float(d.mean())
                diffs["n"] += 1
                for k, (model, enhanced) in enumerate(((exact, a), (fast, b))):
                    found = model.detect(sample.image, enhanced=enhanced).coords
                    if len(sample.truth):
                        f1[k].append(metrics.match_nearest(sample.truth, found).f1)
                        integral[k].append(metrics.f1_integral(sample.truth, found))
                    else:
                        false[k].append(len(found))
        row = dict(family=family, images=diffs["n"], max_diff=diffs["max"], mean_diff=diffs["sum"] / max(diffs["n"], 1))
        if f1[0]:
            row.update(f1=[100 * np.mean(v) for v in f1], integral=[100 * np.mean(v) for v in integral])
        if false[0]:
            row.update(false=[np.mean(v) for v in false])
        rows.append(row)
        print(f"  {family}: {diffs['n']} images ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    lines = [f"Weights {exact.path.name}; each image enhanced in float32 and in bf16, detected with the model's "
             "defaults.", "",
             "| family | images | max / mean abs. difference of the enhanced map | F1 % float32 / bf16 | "
             "F1 integral % float32 / bf16 | false detections per image float32 / bf16 | within 0.3 points |",
             "|---|---:|---|---|---|---|---|"]
    for r in rows:
        ok = all(abs(r[k][0] - r[k][1]) <= 0.3 for k in ("f1", "integral") if k in r)
        cell = lambda k, fmt: " / ".join(fmt.format(v) for v in r[k]) if k in r else "-"  # noqa: E731
        lines.append(f"| {r['family']} | {r['images']} | {r['max_diff']:.4f} / {r['mean_diff']:.5f} | "
                     f"{cell('f1', '{:.2f}')} | {cell('integral', '{:.2f}')} | {cell('false', '{:.2f}')} | "
                     f"{'yes' if ok else '**no**'} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
