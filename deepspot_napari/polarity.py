"""Where the RNA goes in each cell: the wound-healing polarity analysis of the paper (section 4.5) with
DypFISH's polarity index (github cbib/dypfish, src/mpi_calculator.py).

Per cell (``measure_cells``): the cytoplasm is cut into ``sections`` equal angular sections around the
nucleus centroid, section 0 (the reference) centred on the direction of the wound (an angle, a point, or
the nearest point of a line marking the wound edge). Each section's spots per pixel of cytoplasm, over
the whole cytoplasm's, is its relative density. With ``rotate=True`` the sections turn, in one-degree
steps within half a section either way, to the position where the reference section is densest while
it still contains the wound direction (DypFISH's rotation; it biases the index upward, by design).

Per group of cells (``polarity_index``): M = the reference sections' relative densities, Nq = all the
other sections' pooled; PI = 2 * (#{cells with M > median(Nq)} / n) - 1, in [-1, 1] (-1: every cell
poorer toward the wound, 1: every cell richer); the p-value is a two-sided Mann-Whitney U test of M
against Nq; the error is the standard deviation of PI over bootstrap replicates in which each cell's
value is compared with the median of a resample of Nq (``sample_size`` values, or 2/3 of Nq when Nq is
smaller). Unlike DypFISH, an index of exactly 0 is reported as 0 (DypFISH shows 0.01).

The per-pixel pass (which section each cytoplasm pixel and each spot falls in) is C
(csrc/polarity.c); the rest is arithmetic on per-cell counts. Angles are in degrees, counterclockwise
as seen on screen: 0 points right (+x), 90 up (toward row 0). Coordinates are (y, x) pixels.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from . import _core
from .io import atomic_write

__all__ = ["CellTable", "PolarityIndex", "GroupPolarity", "measure_cells", "polarity_index", "group_polarity",
           "polarity_figure", "write_cells_csv", "write_summary_csv", "write_results", "segment_nuclei",
           "simulated_field"]

DEFAULT_SECTIONS = 3          # the paper's three 120-degree sections
SECTIONS_RANGE = (2, 36)      # at least a wound side and a far side; at most 10-degree sections
BOOTSTRAP_REPLICATES = 100    # DypFISH's and the paper's
BOOTSTRAP_SAMPLE_SIZE = 400   # DypFISH's mpi_sample_size
ROTATION_STEP_DEGREES = 1     # DypFISH turns its quadrants in one-degree steps
COMPARTMENTS = ("whole", "cytoplasm")


@dataclass
class CellTable:
    """The cells of one field that could be measured, one row each, and why the others could not.

    labels, nuclei: each cell's label and its nucleus's label; centroids: (y, x) of the nucleus;
    directions: the reference section's centre, degrees (the wound direction, or where the rotation put
    it); areas, counts: [cells, sections] cytoplasm pixels and spots per section, section 0 the
    reference, then counterclockwise. skipped: (cell label, reason) of the cells left out; notes: nuclei
    that belong to no cell;
    spots_outside: spots in no measured cytoplasm (background, nuclei, skipped cells, outside the image).
    section_map: optional [h, w] int32, each measured cytoplasm pixel's section + 1, 0 elsewhere."""
    labels: np.ndarray
    nuclei: np.ndarray
    centroids: np.ndarray
    directions: np.ndarray
    areas: np.ndarray
    counts: np.ndarray
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    spots_outside: int = 0
    spots_total: int = 0
    section_map: np.ndarray | None = None

    @property
    def sections(self) -> int:
        return self.areas.shape[1]

    @property
    def relative_density(self) -> np.ndarray:
        """[cells, sections]: each section's spots per pixel over its cell's whole cytoplasm's."""
        whole = self.counts.sum(1, keepdims=True) / self.areas.sum(1, keepdims=True)
        return (self.counts / self.areas) / whole

    @property
    def messages(self) -> list[str]:
        """What a user should know about this field, one line per problem."""
        out = [f"cell {label}: {reason}" for label, reason in self.skipped] + list(self.notes)
        if self.spots_outside:
            out.append(f"{self.spots_outside} of {self.spots_total} spots lie in no measured cytoplasm "
                       "(background, nuclei, or cells left out); they are not counted")
        return out

    def rows(self, **extra) -> list[dict]:
        """One dict per measured cell (then one per skipped cell, with its reason), for a CSV."""
        rows = []
        density = self.relative_density
        for i, label in enumerate(self.labels):
            row = dict(extra, cell=int(label), nucleus=int(self.nuclei[i]), centroid_y=round(float(self.centroids[i, 0]), 3),
                       centroid_x=round(float(self.centroids[i, 1]), 3), direction_deg=round(float(self.directions[i]), 3),
                       cytoplasm_area=int(self.areas[i].sum()), spots=int(self.counts[i].sum()))
            for s in range(self.sections):
                row[f"section{s}_spots"] = int(self.counts[i, s])
                row[f"section{s}_area"] = int(self.areas[i, s])
                row[f"section{s}_relative_density"] = round(float(density[i, s]), 6)
            row["status"] = "measured"
            rows.append(row)
        for label, reason in self.skipped:
            rows.append(dict(extra, cell=int(label), status=f"skipped: {reason}"))
        return rows


@dataclass
class PolarityIndex:
    """DypFISH's polarity index of one group: index in [-1, 1], error = DypFISH's bootstrap standard
    deviation (it resamples the other sections' values only, so it says how stable the median is, not how
    the index would vary with other cells), pvalue = two-sided Mann-Whitney U of the reference values
    against the others, interval = the 2.5-97.5 percentiles of the index over resamples of the cells
    (the uncertainty due to which cells were imaged; not in DypFISH)."""
    index: float
    error: float
    pvalue: float
    n_cells: int
    interval: tuple
    replicates: np.ndarray = field(repr=False)


@dataclass
class GroupPolarity:
    """A group's polarity index and its per-section relative densities: the median over cells and the
    standard deviation of that median over bootstrap resamples of the cells (the paper's bars)."""
    name: str
    polarity: PolarityIndex
    section_median: np.ndarray
    section_error: np.ndarray
    tables: list


def _angle_to(centroids: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Screen-counterclockwise angle (radians) from each centroid to its point."""
    return np.arctan2(centroids[:, 0] - points[:, 0], points[:, 1] - centroids[:, 1])


def _nearest_on_polyline(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """For each point, the nearest point of the polyline through vertices [k, 2]."""
    if len(vertices) == 1:
        return np.broadcast_to(vertices[0], points.shape).copy()
    a, b = vertices[:-1], vertices[1:]
    ab = b - a
    length2 = np.maximum((ab ** 2).sum(1), 1e-300)
    t = np.clip(((points[:, None, :] - a[None]) * ab[None]).sum(2) / length2[None], 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    best = ((nearest - points[:, None, :]) ** 2).sum(2).argmin(1)
    return nearest[np.arange(len(points)), best]


def _directions(centroids: np.ndarray, angle, towards, wound) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's wound direction (radians) and whether it is defined (False: the wound is at the centroid)."""
    given = [x is not None for x in (angle, towards, wound)]
    if sum(given) != 1:
        raise ValueError("give exactly one reference direction: angle (degrees), towards (a (y, x) point) "
                         "or wound (the (y, x) vertices of a line along the wound edge)")
    if angle is not None:
        angle = float(angle)
        if not math.isfinite(angle):
            raise ValueError(f"angle must be a finite number of degrees, got {angle}")
        return np.full(len(centroids), math.radians(angle)), np.ones(len(centroids), bool)
    if towards is not None:
        target = np.asarray(towards, np.float64)
        if target.shape != (2,) or not np.isfinite(target).all():
            raise ValueError(f"towards must be one finite (y, x) point, got {towards!r}")
        target = np.broadcast_to(target, centroids.shape)
    else:
        vertices = np.asarray(wound, np.float64)
        if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 1 or not np.isfinite(vertices).all():
            raise ValueError(f"wound must be the finite (y, x) vertices of a line, shape (k, 2), got shape "
                             f"{vertices.shape}")
        target = _nearest_on_polyline(centroids, vertices)
    defined = np.hypot(*(target - centroids).T) > 1e-9
    return _angle_to(centroids, target), defined


def _label_image(array, name: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2D label image (one integer label per cell, 0 = background), "
                         f"got {a.ndim} dimensions {a.shape}")
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer labels, got {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} holds negative labels; labels are 0 (background) and positive integers")
    return a.astype(np.int64, copy=False)


def _spot_array(spots) -> np.ndarray:
    coords = getattr(spots, "coords", spots)
    s = np.asarray(coords, np.float64)
    if s.size == 0:
        return np.zeros((0, 2))
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"spots must be an (n, 2) array of (y, x) (or (n, 3) (z, y, x), projected), got shape "
                         f"{s.shape}")
    s = s[:, -2:]
    if not np.isfinite(s).all():
        raise ValueError("spots hold NaN or infinite coordinates")
    return np.ascontiguousarray(s)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, originals): the label image renumbered 0 (background), 1..k in label order, as int32, and
    originals[id] = the label (originals[0] = 0). A bincount for labels up to 2^22, else a sort."""
    top = int(labels.max()) if labels.size else 0
    if top < 2 ** 22:
        originals = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
        originals = np.concatenate([[0], originals[originals > 0]])
        to_id = np.zeros(top + 1, np.int32)
        to_id[originals] = np.arange(len(originals), dtype=np.int32)
        return to_id[labels], originals
    originals, ids = np.unique(labels, return_inverse=True)
    if originals[0] != 0:
        originals, ids = np.concatenate([[0], originals]), ids + 1
    return ids.reshape(labels.shape).astype(np.int32), originals


def _match_nuclei(cell_ids, cell_labels, nucleus_ids, nucleus_labels, compartments: str):
    """The nucleus id of each cell id (0: none matched), the skipped cells' (label, reason), and notes on
    nuclei that belong to no cell. Ids as _compact's."""
    skipped, notes = [], []
    owner = np.zeros(len(nucleus_labels), np.int64)  # cell id of each nucleus id, 0 = none
    if compartments == "whole":
        inside = nucleus_ids > 0
        n_ids, c_ids = nucleus_ids[inside].astype(np.int64), cell_ids[inside].astype(np.int64)
        area = np.bincount(n_ids, minlength=len(nucleus_labels))
        keys, overlap = np.unique(n_ids * len(cell_labels) + c_ids, return_counts=True)
        pair_n, pair_c = keys // len(cell_labels), keys % len(cell_labels)
        overlap = np.where(pair_c > 0, overlap, 0)
        order = np.lexsort((-overlap, pair_n))  # per nucleus, the cell overlapping it most first
        first = order[np.r_[True, pair_n[order][1:] != pair_n[order][:-1]]]
        best_cell, best_overlap = np.zeros_like(owner), np.zeros_like(owner)
        best_cell[pair_n[first]], best_overlap[pair_n[first]] = pair_c[first], overlap[first]
        mostly_inside = best_overlap * 2 >= area
        mostly_inside[0] = True  # the background
        owner = np.where(mostly_inside, best_cell, 0)
        for n in np.flatnonzero(~mostly_inside).tolist():
            notes.append(f"nucleus {nucleus_labels[n]} lies mostly outside every cell; it is ignored")
    else:  # the cytoplasm image's label k and the nucleus image's label k are one cell
        position = np.searchsorted(cell_labels, nucleus_labels).clip(0, len(cell_labels) - 1)
        same = cell_labels[position] == nucleus_labels
        same[0] = True  # the background
        owner = np.where(same, position, 0)
        for n in np.flatnonzero(~same).tolist():
            notes.append(f"nucleus {nucleus_labels[n]} has no cytoplasm of the same label; it is ignored")
    nuclei_per_cell = np.bincount(owner[1:], minlength=len(cell_labels))
    nucleus_of = np.zeros(len(cell_labels), np.int64)
    owned = np.flatnonzero(owner > 0)
    alone = owned[nuclei_per_cell[owner[owned]] == 1]  # the nuclei that are their cell's only one
    nucleus_of[owner[alone]] = alone
    for c in range(1, len(cell_labels)):
        if nuclei_per_cell[c] == 0:
            skipped.append((int(cell_labels[c]), "no nucleus"))
        elif nuclei_per_cell[c] > 1:
            found = sorted(int(nucleus_labels[n]) for n in np.flatnonzero(owner == c))
            skipped.append((int(cell_labels[c]), f"{len(found)} nuclei ({', '.join(map(str, found))}); "
                                                 "one per cell is needed"))
    return nucleus_of, skipped, notes


def measure_cells(spots, cells, nuclei, *, angle: float | None = None, towards=None, wound=None,
                  sections: int = DEFAULT_SECTIONS, rotate: bool = False, compartments: str = "whole",
                  section_map: bool = False) -> CellTable:
    """Per-cell spot counts, areas and relative densities of the sections around each nucleus.

    spots: (n, 2) (y, x) or a Spots table (Model.detect); (n, 3) (z, y, x) is projected onto (y, x).
    cells, nuclei: 2D integer label images of one shape (0 = background). compartments "whole": cells
    are whole cells (a nucleus belongs to the cell holding most of it; its pixels are left out of the
    cytoplasm); "cytoplasm": cells are already cytoplasm only, and nucleus k belongs to cell k.
    One reference direction: angle (degrees, 0 = right, 90 = up on screen), towards (a (y, x) point,
    e.g. a clicked point in the wound) or wound ((k, 2) (y, x) vertices of a line along the wound edge;
    each cell looks to its nearest point). rotate: DypFISH's rotation (module docstring).
    section_map: also return each measured cytoplasm pixel's section + 1 (for overlays).

    Cells that cannot be measured (no nucleus, several, no spots in the cytoplasm, an empty section,
    the wound at the centroid) are left out with their reason in CellTable.skipped; the others count."""
    if compartments not in COMPARTMENTS:
        raise ValueError(f"compartments must be one of {COMPARTMENTS}, got {compartments!r}")
    sections = int(sections)
    if not SECTIONS_RANGE[0] <= sections <= SECTIONS_RANGE[1]:
        raise ValueError(f"sections must be between {SECTIONS_RANGE[0]} and {SECTIONS_RANGE[1]}, got {sections}")
    if rotate and 360 % sections:
        raise ValueError(f"rotate needs sections that divide 360 degrees (e.g. 3 or 4), got {sections}")
    cells, nuclei = _label_image(cells, "cells"), _label_image(nuclei, "nuclei")
    if cells.shape != nuclei.shape:
        raise ValueError(f"cells {cells.shape} and nuclei {nuclei.shape} must have the same shape")
    points = _spot_array(spots)
    cell_ids, cell_labels = _compact(cells)
    nucleus_ids, nucleus_labels = _compact(nuclei)
    nucleus_of_cell, skipped, notes = _match_nuclei(cell_ids, cell_labels, nucleus_ids, nucleus_labels, compartments)
    measured_ids = np.flatnonzero(nucleus_of_cell)          # cell ids with exactly one nucleus, in label order
    labels = cell_labels[measured_ids]
    nucleus_of = nucleus_labels[nucleus_of_cell[measured_ids]]
    # nucleus centroids: the mean of each matched nucleus's pixels
    row_of_nucleus = np.full(len(nucleus_labels), -1)
    row_of_nucleus[nucleus_of_cell[measured_ids]] = np.arange(len(measured_ids))
    rows = row_of_nucleus[nucleus_ids]
    keep = rows >= 0
    yy, xx = np.nonzero(keep)
    weight = np.maximum(np.bincount(rows[keep], minlength=len(labels)), 1)
    centroids = np.stack([np.bincount(rows[keep], yy, len(labels)), np.bincount(rows[keep], xx, len(labels))], 1)
    centroids = centroids.reshape(len(labels), 2) / weight[:, None]
    theta, defined = _directions(centroids, angle, towards, wound)
    for c in labels[~defined].tolist():
        skipped.append((c, "the wound is at its nucleus centroid, so it has no direction"))
    width = 2 * math.pi / sections

    use = defined
    row_of_cell = np.full(len(cell_labels), -1, np.int32)  # cell id -> row of the cells measured
    row_of_cell[measured_ids[use]] = np.arange(int(use.sum()), dtype=np.int32)
    cell_of_pixel = row_of_cell[cell_ids]
    if compartments == "whole":
        cell_of_pixel[nucleus_ids > 0] = -1

    def histograms(origins, bins, with_map=False):  # the C pass (csrc/polarity.c)
        return _core.polarity_histograms(cell_of_pixel, np.ascontiguousarray(centroids[use]),
                                         np.ascontiguousarray(origins, np.float64), int(bins), points, with_map)

    if rotate and use.any():
        # one-degree bins from half a section before the reference section's earliest start
        steps = 360
        step_width = 360 // sections
        origins = theta[use] - width
        area, count, _, _ = histograms(origins, steps)
        # window k covers bins [k, k + step_width): the reference section centred at theta - width/2 + k degrees,
        # k = 0 .. step_width - 1, so it always contains theta
        windows = np.arange(step_width)
        area_w = np.stack([area[:, (k + np.arange(step_width)) % steps].sum(1) for k in windows], 1)
        count_w = np.stack([count[:, (k + np.arange(step_width)) % steps].sum(1) for k in windows], 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            density = np.where(area_w > 0, count_w / np.maximum(area_w, 1), -np.inf)
        best = density.argmax(1)
        theta = theta.copy()
        theta[use] = theta[use] - width / 2 + np.radians(best * ROTATION_STEP_DEGREES)
    area, count, cell_of_spot, bin_map = histograms(theta[use] - width / 2, sections, section_map)
    kept = np.ones(len(area), bool)
    measured_labels = labels[use]
    for i, c in enumerate(measured_labels.tolist()):
        if (area[i] == 0).any():
            kept[i] = False
            skipped.append((c, "a section holds no cytoplasm (cell too small or nucleus at its edge)"))
        elif count[i].sum() == 0:
            kept[i] = False
            skipped.append((c, "no spots in its cytoplasm, so no relative density"))
    in_kept = (cell_of_spot >= 0) & kept[np.maximum(cell_of_spot, 0)] if len(cell_of_spot) else np.zeros(0, bool)
    if bin_map is not None:  # section + 1 of the kept cells' cytoplasm, 0 elsewhere
        bin_map = np.where(bin_map >= 0, bin_map + 1, 0).astype(np.int32)
        bin_map[np.isin(cell_ids, measured_ids[use][~kept])] = 0
    return CellTable(labels=measured_labels[kept], nuclei=nucleus_of[use][kept], centroids=centroids[use][kept],
                     directions=np.degrees(theta[use][kept]) % 360, areas=area[kept], counts=count[kept],
                     skipped=skipped, notes=notes, spots_outside=int(len(points) - in_kept.sum()),
                     spots_total=len(points), section_map=bin_map)


def polarity_index(reference, others, *, bootstrap: int = BOOTSTRAP_REPLICATES,
                   sample_size: int = BOOTSTRAP_SAMPLE_SIZE, seed: int = 0) -> PolarityIndex:
    """DypFISH's polarity index of M = reference (one value per cell) against Nq = others (the other
    sections' values, one row per cell, or flat cell after cell), its bootstrap error, the Mann-Whitney
    p-value (module docstring), and a 95 % interval from resampling the cells.
    DypFISH's test vector: polarity_index([1] * 7, [7] * 7).index == -1.0."""
    from scipy.stats import mannwhitneyu

    m = np.asarray(reference, np.float64).ravel()
    nq = np.asarray(others, np.float64)
    if len(m) == 0 or nq.size == 0:
        raise ValueError(f"the polarity index needs cells: got {len(m)} reference and {nq.size} other values")
    if nq.size % len(m):
        raise ValueError(f"others must hold the same number of values for each of the {len(m)} cells, got {nq.size}")
    nq = nq.reshape(len(m), -1)
    if not (np.isfinite(m).all() and np.isfinite(nq).all()):
        raise ValueError("the polarity index's values must be finite")
    if int(bootstrap) < 1 or int(sample_size) < 1:
        raise ValueError(f"bootstrap and sample_size must be >= 1, got {bootstrap}, {sample_size}")

    def index(ref, medians):
        return 2.0 * np.count_nonzero(ref - medians > 0) / len(ref) - 1.0

    pooled = nq.ravel()
    k = int(sample_size) if int(sample_size) < len(pooled) else max(1, (2 * len(pooled)) // 3)
    rng = np.random.default_rng(seed)
    replicates = np.array([index(m, np.median(rng.choice(pooled, (len(m), k)), axis=1))
                           for _ in range(int(bootstrap))])
    cells = [rng.integers(0, len(m), len(m)) for _ in range(int(bootstrap))]
    resampled = np.array([index(m[c], np.median(nq[c])) for c in cells])
    p = float(mannwhitneyu(m, pooled, alternative="two-sided").pvalue)
    return PolarityIndex(index=float(index(m, np.median(pooled))), error=float(replicates.std()), pvalue=p,
                         n_cells=len(m), interval=(float(np.percentile(resampled, 2.5)),
                                                   float(np.percentile(resampled, 97.5))),
                         replicates=replicates)


def group_polarity(name: str, tables: Sequence[CellTable], *, bootstrap: int = BOOTSTRAP_REPLICATES,
                   sample_size: int = BOOTSTRAP_SAMPLE_SIZE, seed: int = 0) -> GroupPolarity:
    """The polarity of a group of cells measured in one or more fields (the same sections in each)."""
    tables = list(tables)
    density = [t.relative_density for t in tables if len(t.labels)]
    if not density:
        raise ValueError(f"group {name!r} has no measured cells")
    if len({d.shape[1] for d in density}) != 1:
        raise ValueError(f"group {name!r} mixes fields measured with different numbers of sections")
    d = np.concatenate(density)
    polarity = polarity_index(d[:, 0], d[:, 1:], bootstrap=bootstrap, sample_size=sample_size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    resampled = np.stack([np.median(d[rng.integers(0, len(d), len(d))], axis=0) for _ in range(int(bootstrap))])
    return GroupPolarity(name=name, polarity=polarity, section_median=np.median(d, axis=0),
                         section_error=resampled.std(axis=0), tables=tables)


def polarity_figure(groups: Sequence[GroupPolarity]):
    """The paper's figure: per group, each section's median relative density with its bootstrap error
    (section 0 = toward the wound), and each group's polarity index with its error. A matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    groups = list(groups)
    fig = Figure(figsize=(4 + 1.6 * len(groups), 3.4), dpi=120)
    ax_density, ax_index = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[2, 1]))
    n_sections = groups[0].section_median.shape[0]
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        x = np.arange(n_sections) + (g - (len(groups) - 1) / 2) * width
        ax_density.bar(x, group.section_median, width, yerr=group.section_error, capsize=3,
                       label=f"{group.name} (n={group.polarity.n_cells})")
    ax_density.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax_density.set_xticks(range(n_sections), ["wound"] + [f"section {s}" for s in range(1, n_sections)])
    ax_density.set_ylabel("relative spot density (median)")
    ax_density.legend(fontsize=7)
    names = [g.name for g in groups]
    ax_index.bar(range(len(groups)), [g.polarity.index for g in groups], 0.6,
                 yerr=[g.polarity.error for g in groups], capsize=3, color=[f"C{g}" for g in range(len(groups))])
    for g, group in enumerate(groups):
        up = group.polarity.index >= 0
        end = group.polarity.index + (group.polarity.error if up else -group.polarity.error)
        ax_index.annotate(f"p={group.polarity.pvalue:.2g}", (g, end), ha="center", fontsize=7,
                          xytext=(0, 4 if up else -11), textcoords="offset points")
    ax_index.axhline(0.0, color="0.3", lw=0.8)
    ax_index.set_ylim(-1.15, 1.15)
    ax_index.set_xticks(range(len(groups)), names)
    ax_index.set_ylabel("polarity index")
    fig.tight_layout()
    return fig


def _write_csv(path, rows: list[dict]) -> None:
    """All rows' keys as columns; written atomically (io.atomic_write), so no half-written CSV is left."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_write(path, "w") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_cells_csv(path, groups: Mapping[str, Sequence[tuple[str, CellTable]]]) -> None:
    """One row per cell of every field of every group: {group: [(field name, CellTable)]}."""
    _write_csv(path, [row for group, fields in groups.items() for name, table in fields
                      for row in table.rows(group=group, field=name)])


def write_summary_csv(path, groups: Sequence[GroupPolarity]) -> None:
    """One row per group: cells, polarity index, error, p-value, each section's median and error."""
    rows = []
    for g in groups:
        row = dict(group=g.name, cells=g.polarity.n_cells, polarity_index=round(g.polarity.index, 6),
                   error=round(g.polarity.error, 6), pvalue=g.polarity.pvalue,
                   interval_low=round(g.polarity.interval[0], 6), interval_high=round(g.polarity.interval[1], 6))
        for s, (median, error) in enumerate(zip(g.section_median, g.section_error)):
            row[f"section{s}_median_relative_density"] = round(float(median), 6)
            row[f"section{s}_error"] = round(float(error), 6)
        rows.append(row)
    _write_csv(path, rows)


RESULT_FILES = ("cells.csv", "summary.csv", "polarity.png")


def write_results(folder, fields: Mapping[str, Sequence[tuple[str, CellTable]]],
                  groups: Sequence[GroupPolarity]) -> list:
    """cells.csv (write_cells_csv), and when any group has a result, summary.csv and polarity.png, into
    folder (created if needed), each written atomically. Returns the paths written."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in RESULT_FILES]
    write_cells_csv(paths[0], fields)
    if not groups:
        return paths[:1]
    write_summary_csv(paths[1], groups)
    with atomic_write(paths[2]) as handle:
        polarity_figure(groups).savefig(handle, format="png")
    return paths


def segment_nuclei(dapi, *, smoothing: float = 2.0, min_area: int = 50) -> np.ndarray:
    """A simple nucleus label image from a DAPI channel (a convenience; bring your own masks for real
    work): Gaussian smoothing, Otsu's threshold, holes filled, objects below min_area pixels dropped,
    touching nuclei split by a watershed on the distance to the background. Needs scikit-image."""
    try:
        from skimage.feature import peak_local_max
        from skimage.filters import gaussian, threshold_otsu
        from skimage.morphology import remove_small_objects
        from skimage.segmentation import watershed
    except ImportError:
        raise ImportError("segment_nuclei needs scikit-image: pip install scikit-image") from None
    from scipy import ndimage as ndi

    image = np.asarray(dapi, np.float64)
    if image.ndim != 2 or not np.isfinite(image).all():
        raise ValueError(f"dapi must be a finite 2D image, got shape {image.shape}")
    if image.min() == image.max():
        raise ValueError("dapi is constant: there are no nuclei to find")
    smooth = gaussian(image, smoothing)
    mask = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
    mask = remove_small_objects(mask, min_area)
    distance = ndi.distance_transform_edt(mask)
    components, _ = ndi.label(mask)
    peaks = peak_local_max(distance, min_distance=max(3, int(np.sqrt(min_area / np.pi))), labels=components,
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask).astype(np.int32)


def simulated_field(rng, *, shape=(256, 384), cell_radius=(28.0, 40.0), spots_per_cell=(30, 60),
                    direction: float = 90.0, enrichment: float = 1.0) -> dict:
    """A field of simulated cells for tests and the worked example (docs/polarity.md): elliptical cells
    on a grid, each with an off-centre elliptical nucleus, spots in the cytoplasm whose angular density
    around the nucleus centroid is proportional to 1 + enrichment * cos(angle - direction) (enrichment 0:
    uniform; 1: none on the far side), and an image of them (cytoplasm glow, nuclei, Gaussian spots,
    Poisson noise) and a DAPI channel of the nuclei. Returns {"image", "dapi" uint16, "cells", "nuclei" int32
    labels, "spots" (n, 2) (y, x)}."""
    if not 0 <= enrichment <= 1:
        raise ValueError(f"enrichment must be in [0, 1], got {enrichment}")
    rng = np.random.default_rng(rng)
    h, w = shape
    cells = np.zeros(shape, np.int32)
    nuclei = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[0:h, 0:w]
    pitch = 2 * cell_radius[1] + 4
    spots, label = [], 0
    for cy in np.arange(pitch / 2, h - pitch / 2 + 1, pitch):
        for cx in np.arange(pitch / 2, w - pitch / 2 + 1, pitch):
            label += 1
            a, b = rng.uniform(*cell_radius, 2)
            t = rng.uniform(0, np.pi)
            u, v = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t), -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
            cell = (u / a) ** 2 + (v / b) ** 2 <= 1
            ny, nx = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
            nr = rng.uniform(0.3, 0.4) * min(a, b)
            nucleus = ((yy - ny) / nr) ** 2 + ((xx - nx) / (nr * rng.uniform(0.8, 1.2))) ** 2 <= 1
            cells[cell] = label
            nuclei[nucleus & cell] = label
            # spots: uniform in the cytoplasm, then kept with probability (1 + e cos) / (1 + e)
            cyto_y, cyto_x = np.nonzero(cell & ~nucleus)
            want = int(rng.integers(spots_per_cell[0], spots_per_cell[1] + 1))
            my, mx = np.nonzero(nucleus & cell)
            centre = np.array([my.mean(), mx.mean()])
            got = []
            while len(got) < want:
                k = rng.integers(0, len(cyto_y), 4 * want)
                p = np.stack([cyto_y[k], cyto_x[k]], 1) + rng.uniform(-0.5, 0.5, (4 * want, 2))
                angle = np.arctan2(centre[0] - p[:, 0], p[:, 1] - centre[1])
                accept = rng.random(len(p)) < (1 + enrichment * np.cos(angle - np.radians(direction))) / (1 + enrichment)
                got.extend(p[accept].tolist())
            spots.extend(got[:want])
    spots = np.array(spots).reshape(-1, 2)
    photons = 20 + 30 * (cells > 0) + 25 * (nuclei > 0)
    signal = photons.astype(np.float64)
    iy, ix = np.rint(spots).astype(int).T
    np.add.at(signal, (iy.clip(0, h - 1), ix.clip(0, w - 1)), 900.0)
    from scipy import ndimage as ndi
    signal = photons + ndi.gaussian_filter(signal - photons, 1.2)  # spots: peak 900 / (2 pi 1.2^2) ~ 100 photons
    image = np.clip(rng.poisson(signal) + 100, 0, 65535).astype(np.uint16)
    dapi = np.clip(rng.poisson(10 + ndi.gaussian_filter(200.0 * (nuclei > 0), 1.0)) + 100, 0, 65535).astype(np.uint16)
    return dict(image=image, dapi=dapi, cells=cells, nuclei=nuclei, spots=spots)
