"""Detection metrics against annotated spot positions (docs/reference_model.md section 4).

Three ways to pair annotations with detections, all at a distance cutoff (inclusive, in pixels):
* match_nearest: the paper's protocol. Each annotation takes its nearest detection within the
  cutoff (k-d tree, one neighbour); several annotations may take the same detection.
* match_hungarian: one-to-one (Spotiflow, deepBlink): the largest number of pairs within the
  cutoff, and among those the smallest total distance.
* f1_integral: the Hungarian F1 over 50 cutoffs in [0, 3] px, averaged over the cutoffs
  (deepBlink, Piscis); by default with deepBlink's trapezoid weights, rule="mean" for equal ones.
Per-image results are summarised as a mean with a 95% confidence interval over images
(summarize / evaluate).

Counting (see MatchCounts): tp + fp = detections; tp + fn + ambiguous = annotations.
A ratio whose denominator is zero is 1 when there are neither annotations nor detections, and 0
otherwise; so F1 = 1 when both are empty and 0 when only one is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

PAPER_CUTOFF = 3.0
F1_INTEGRAL_CUTOFFS = 50


@dataclass(frozen=True)
class MatchCounts:
    """tp: detections matched by at least one annotation (each counted once).
    fp: detections matched by no annotation.
    fn: annotations with no detection within the cutoff.
    ambiguous: annotations beyond the first on one detection (a detection taken by k annotations
        adds k - 1): the paper's ambiguous matches (AM). They count against recall like missed
        spots, since one detection can stand for only one of them. Always 0 for one-to-one matching.
    """

    tp: int
    fp: int
    fn: int
    ambiguous: int = 0

    @property
    def n_detections(self) -> int:
        return self.tp + self.fp

    @property
    def n_annotations(self) -> int:
        return self.tp + self.fn + self.ambiguous

    def _ratio(self, numerator: int, denominator: int) -> float:
        if denominator > 0:
            return numerator / denominator
        return 1.0 if self.n_annotations == 0 and self.n_detections == 0 else 0.0

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.n_detections)

    @property
    def recall(self) -> float:
        return self._ratio(self.tp, self.n_annotations)

    @property
    def f1(self) -> float:
        """2 tp / (annotations + detections), the harmonic mean of precision and recall."""
        return self._ratio(2 * self.tp, self.n_annotations + self.n_detections)


def match_nearest(annotations, detections, cutoff: float = PAPER_CUTOFF) -> MatchCounts:
    """The paper's protocol: each annotation's nearest detection, if within `cutoff`."""
    annotations, detections = _as_point_sets(annotations, detections)
    if len(annotations) == 0 or len(detections) == 0:
        return MatchCounts(tp=0, fp=len(detections), fn=len(annotations))
    distance, nearest = cKDTree(detections).query(annotations, k=1)
    matched = distance <= cutoff
    hits = np.bincount(nearest[matched], minlength=len(detections))
    tp = int(np.count_nonzero(hits))
    return MatchCounts(tp=tp, fp=len(detections) - tp, fn=int(np.count_nonzero(~matched)),
                       ambiguous=int(np.count_nonzero(matched)) - tp)


def match_hungarian(annotations, detections, cutoff: float = PAPER_CUTOFF) -> MatchCounts:
    """One-to-one matching: the most pairs within `cutoff`, then the least total distance."""
    annotations, detections = _as_point_sets(annotations, detections)
    return _hungarian_counts(_candidate_pairs(annotations, detections, cutoff), cutoff, len(annotations),
                             len(detections))


def f1_integral(annotations, detections, max_cutoff: float = PAPER_CUTOFF, n_cutoffs: int = F1_INTEGRAL_CUTOFFS,
                rule: str = "trapezoid") -> float:
    """The Hungarian F1 at n_cutoffs cutoffs evenly spaced in [0, max_cutoff], averaged.

    rule="trapezoid": the area under F1(cutoff) by the trapezoid rule, divided by max_cutoff, which
    is how deepBlink computes it (np.trapz(f1, cutoffs) / mdist): the end points weigh half.
    rule="mean": the plain mean of the n_cutoffs F1 values.
    """
    if rule not in ("trapezoid", "mean"):
        raise ValueError(f"rule must be 'trapezoid' or 'mean', not {rule!r}")
    if not max_cutoff > 0 or n_cutoffs < 2:
        raise ValueError("f1_integral needs max_cutoff > 0 and n_cutoffs >= 2")
    annotations, detections = _as_point_sets(annotations, detections)
    pairs = _candidate_pairs(annotations, detections, max_cutoff)
    cutoffs = np.linspace(0.0, max_cutoff, n_cutoffs)
    f1 = np.array([_hungarian_counts(pairs, c, len(annotations), len(detections)).f1 for c in cutoffs])
    if rule == "mean":
        return float(f1.mean())
    return float(np.sum((f1[1:] + f1[:-1]) / 2 * np.diff(cutoffs)) / max_cutoff)


@dataclass(frozen=True)
class Summary:
    """mean over n images, with the two-sided 95% confidence interval of the mean from the
    t-distribution (n - 1 degrees of freedom): mean -/+ t * sd / sqrt(n), sd with ddof=1.
    With one image the interval is undefined (NaN)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    values = np.asarray(list(values), dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("summarize needs at least one value")
    mean = float(values.mean())
    if values.size == 1:
        return Summary(mean, float("nan"), float("nan"), 1)
    half = stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return Summary(mean, float(mean - half), float(mean + half), int(values.size))


def evaluate(pairs, protocol: str = "nearest", cutoff: float = PAPER_CUTOFF) -> dict[str, Summary]:
    """pairs: (annotations, detections) per image. protocol: "nearest" (the paper) or "hungarian".
    Returns f1, precision, recall, ambiguous (per image) and f1_integral, each a Summary over images."""
    match = {"nearest": match_nearest, "hungarian": match_hungarian}.get(protocol)
    if match is None:
        raise ValueError(f"protocol must be 'nearest' or 'hungarian', not {protocol!r}")
    per_image = {"f1": [], "precision": [], "recall": [], "ambiguous": [], "f1_integral": []}
    for annotations, detections in pairs:
        counts = match(annotations, detections, cutoff)
        per_image["f1"].append(counts.f1)
        per_image["precision"].append(counts.precision)
        per_image["recall"].append(counts.recall)
        per_image["ambiguous"].append(counts.ambiguous)
        per_image["f1_integral"].append(f1_integral(annotations, detections))
    return {name: summarize(values) for name, values in per_image.items()}


def _as_point_sets(annotations, detections) -> tuple[np.ndarray, np.ndarray]:
    """Both as float (n, d) arrays of one d; an empty input of any shape is (0, d)."""
    a = np.asarray(annotations, dtype=float)
    b = np.asarray(detections, dtype=float)
    dims = {x.shape[1] for x in (a, b) if x.size and x.ndim == 2}
    for name, x in (("annotations", a), ("detections", b)):
        if x.size and x.ndim != 2:
            raise ValueError(f"{name} must be an (n, d) array of coordinates, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contain NaN or infinite coordinates")
    if len(dims) > 1:
        raise ValueError(f"annotations and detections have different dimensions: {sorted(dims)}")
    d = dims.pop() if dims else 2
    return a.reshape(-1, d), b.reshape(-1, d)


def _candidate_pairs(annotations: np.ndarray, detections: np.ndarray, cutoff: float) -> np.ndarray:
    """Structured array (i, j, v) of annotation i, detection j at distance v <= cutoff."""
    if len(annotations) == 0 or len(detections) == 0:
        return np.zeros(0, dtype=[("i", np.intp), ("j", np.intp), ("v", float)])
    return cKDTree(annotations).sparse_distance_matrix(cKDTree(detections), cutoff, output_type="ndarray")


def _hungarian_counts(pairs: np.ndarray, cutoff: float, n_annotations: int, n_detections: int) -> MatchCounts:
    """Solves the assignment separately on each connected group of candidate pairs, which keeps
    the cost matrices small on large images."""
    pairs = pairs[pairs["v"] <= cutoff]
    tp = 0
    if len(pairs):
        # one graph over annotations (0..n_annotations-1) and detections (after them)
        rows, cols = pairs["i"], pairs["j"] + n_annotations
        n_nodes = n_annotations + n_detections
        graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n_nodes, n_nodes))
        _, labels = connected_components(graph, directed=False)
        group_of_pair = labels[rows]
        order = np.argsort(group_of_pair, kind="stable")
        boundaries = np.flatnonzero(np.diff(group_of_pair[order])) + 1
        for members in np.split(order, boundaries):
            tp += _max_matching_size(pairs[members], cutoff)
    return MatchCounts(tp=tp, fp=n_detections - tp, fn=n_annotations - tp)


def _max_matching_size(pairs: np.ndarray, cutoff: float) -> int:
    """Pairs of one connected group: linear_sum_assignment on the group's dense distances, with
    absent pairs costing more than any set of real ones, so that it first maximises their number."""
    annotation_ids, i = np.unique(pairs["i"], return_inverse=True)
    detection_ids, j = np.unique(pairs["j"], return_inverse=True)
    absent = (cutoff + 1.0) * (min(len(annotation_ids), len(detection_ids)) + 1)
    cost = np.full((len(annotation_ids), len(detection_ids)), absent)
    cost[i, j] = pairs["v"]
    r, c = linear_sum_assignment(cost)
    return int(np.count_nonzero(cost[r, c] < absent))
