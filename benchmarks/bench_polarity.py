"""Seconds for the polarity analysis of one large field of hundreds of cells, against a vectorised
NumPy version of the same per-pixel pass run in this script.

    python benchmarks/bench_polarity.py [--tiles 8 5] [--repeat 5]

The field tiles polarity.simulated_field (256x384, 12 cells) --tiles times (default 2048x1920, 480
cells, ~20,000 spots). Rows: measure_cells with fixed sections and with DypFISH's rotation (360
one-degree bins), group_polarity (index, bootstrap, cell-resampling interval), and the NumPy pass
(arctan2 over every cytoplasm pixel + bincount) against the C pass it stands for. Median of
--repeat runs after a warm-up. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from checkout import import_package  # noqa: E402  (benchmarks/ is the script's directory)

import_package()
from deepspot_napari import _core, polarity as P  # noqa: E402


def tiled_field(tiles):
    rows, cols = tiles
    cells, nuclei, spots = [], [], []
    offset = 0
    for r in range(rows):
        row_c, row_n = [], []
        for c in range(cols):
            f = P.simulated_field(r * cols + c, enrichment=0.5)
            h, w = f["cells"].shape
            row_c.append(np.where(f["cells"] > 0, f["cells"] + offset, 0))
            row_n.append(np.where(f["nuclei"] > 0, f["nuclei"] + offset, 0))
            spots.append(f["spots"] + [r * h, c * w])
            offset += int(f["cells"].max())
        cells.append(np.concatenate(row_c, 1))
        nuclei.append(np.concatenate(row_n, 1))
    return np.concatenate(spots), np.concatenate(cells), np.concatenate(nuclei)


def sections_of(y, x, centroids, origin, sections):
    """The same floating-point steps as csrc/polarity.c, so that pixels on a section edge agree."""
    angle = np.fmod(np.arctan2(centroids[:, 0] - y, x - centroids[:, 1]) - origin, 2 * math.pi)
    angle = np.where(angle < 0, angle + 2 * math.pi, angle)
    return np.minimum((angle * (sections / (2 * math.pi))).astype(int), sections - 1)


def numpy_pass(spots, cells, nuclei, table, sections):
    """The C pass in NumPy: each cytoplasm pixel's and spot's section around its cell's centroid."""
    labels = table.labels
    lookup = np.full(int(cells.max()) + 1, -1)
    lookup[labels] = np.arange(len(labels))
    index = np.where(nuclei == 0, lookup[cells], -1)
    yy, xx = np.nonzero(index >= 0)
    c = index[yy, xx]
    origin = np.radians(table.directions) - math.pi / sections
    section = sections_of(yy, xx, table.centroids[c], origin[c], sections)
    area = np.bincount(c * sections + section, minlength=len(labels) * sections).reshape(-1, sections)
    r = np.rint(spots).astype(int)
    inside = (r >= 0).all(1) & (r[:, 0] < cells.shape[0]) & (r[:, 1] < cells.shape[1])
    sc = np.full(len(spots), -1)
    sc[inside] = index[r[inside, 0], r[inside, 1]]
    keep = sc >= 0
    s_section = sections_of(spots[keep, 0], spots[keep, 1], table.centroids[sc[keep]], origin[sc[keep]], sections)
    counts = np.bincount(sc[keep] * sections + s_section, minlength=len(labels) * sections).reshape(-1, sections)
    return area, counts


def timed(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, nargs=2, default=(8, 5))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    spots, cells, nuclei = tiled_field(args.tiles)
    t_fixed, table = timed(lambda: P.measure_cells(spots, cells, nuclei, angle=90), args.repeat)
    t_rotate, _ = timed(lambda: P.measure_cells(spots, cells, nuclei, angle=90, rotate=True), args.repeat)
    t_group, _ = timed(lambda: P.group_polarity("all", [table]), args.repeat)
    t_numpy, (area, counts) = timed(lambda: numpy_pass(spots, cells, nuclei, table, 3), args.repeat)
    lookup = np.full(int(cells.max()) + 1, -1)
    lookup[table.labels] = np.arange(len(table.labels))
    cell_of_pixel = np.where(nuclei == 0, lookup[cells], -1).astype(np.int32)
    origins = np.radians(table.directions) - math.pi / 3
    t_c, _ = timed(lambda: _core.polarity_histograms(cell_of_pixel, table.centroids, origins, 3, spots), args.repeat)
    assert (area == table.areas).all() and (counts == table.counts).all(), "the NumPy pass disagrees with C"
    print(f"field {cells.shape[0]}x{cells.shape[1]}, {len(table.labels)} cells, {len(spots)} spots, "
          f"median of {args.repeat}\n")
    print("| step | seconds |\n|---|---|")
    print(f"| measure_cells, fixed sections (labels, centroids, C pass) | {t_fixed:.3f} |")
    print(f"| measure_cells, DypFISH rotation (360 bins) | {t_rotate:.3f} |")
    print(f"| group_polarity (index, 100 bootstrap replicates, interval) | {t_group:.3f} |")
    print(f"| the C per-pixel pass alone (csrc/polarity.c) | {t_c:.3f} |")
    print(f"| NumPy version of the per-pixel pass alone (same counts) | {t_numpy:.3f} ({t_numpy / t_c:.1f}x the C pass) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
