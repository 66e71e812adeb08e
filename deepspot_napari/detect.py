"""Spot detection on enhanced images (2D planes and z-stacks), returning a `Spots` table.

Two detectors, both in the C core (csrc/detect.c, GIL released): "peak" (local maxima above an
absolute threshold, with a minimum distance) for the network's enhanced output, and "wavelet",
the Icy undecimated-wavelet detector the paper used (docs/reference_model.md section 4.1). A z-stack is
detected plane by plane and a molecule seen in adjacent planes is merged into one spot (also in C);
larger stacks (time points, channels, ...) are detected one z-stack or one plane at a time.
DEFAULT_DETECTION is the one place that holds the default parameters.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import _core
from .errors import Cancelled

METHODS = ("peak", "wavelet")
SUBPIXEL_MODES = ("none", "centroid", "gaussian")
# How a stack (..., Y, X) is detected: "zstack": its last three axes are a z-stack (spots merged
# across adjacent planes), one per index of the axes before them; "planes": every (Y, X) plane alone.
STACK_MODES = ("zstack", "planes")
# Columns of the C core's spot rows.
_Z, _Y, _X, _SCORE, _INTENSITY, _SIZE = range(6)


@dataclass(frozen=True)
class DetectionParams:
    """Detection parameters; see detect_spots() for what each one means. The field defaults are the
    defaults for ENHANCED images, chosen once on simulated validation data (never the test sets)
    by tools/choose_detection_defaults.py; the table and the reasoning are in
    docs/detection_defaults.md. Enhanced images are in [0, 1]: spot centres come out near 1 (the
    training stamp is 255 at the centre, 200..230 around it) while the background stays below
    about 0.5, so one absolute threshold separates them."""

    method: str = "peak"
    # peak detector
    threshold: float = 0.75
    min_distance: float = 0.0
    footprint_radius: int = 1
    # wavelet detector: the best wavelet setting, used when only method="wavelet" is overridden
    scales: tuple[int, ...] = (1, 2)
    sensitivities: tuple[float, ...] = (20.0,)
    # both
    subpixel: str = "none"
    window_radius: int = 3
    # z-stacks
    merge_radius: float = 2.0


DEFAULT_DETECTION = DetectionParams()


@dataclass(frozen=True)
class Spots:
    """Detected spots, one row each. coords: (n, 2) as (y, x) or (n, 3) as (z, y, x), in pixels,
    0-based, (0, 0) the centre of the first pixel; for a larger stack, one column per axis of the
    image, named by `axes` (the leading ones "axis0", "axis1", ...). score: the enhanced (detection) image at the spot
    (peak value, or the component maximum for the wavelet detector). intensity: the raw image at the
    rounded position (the enhanced image when no raw image was given). size: wavelet: pixels in the
    spot's component; peak: its half-maximum area in pixels; for z-stacks summed over the planes
    the molecule spans."""

    coords: np.ndarray
    score: np.ndarray
    intensity: np.ndarray
    size: np.ndarray
    axes: tuple[str, ...] = ()  # the names of coords' columns; () for (y, x) or (z, y, x)

    def __len__(self) -> int:
        return len(self.coords)

    def as_table(self) -> dict[str, np.ndarray]:
        """Column name -> 1D array, in order: the axes ([z,] y, x), score, intensity, size."""
        axes = self.axes or ("z", "y", "x")[-self.coords.shape[1]:]
        table = {axis: self.coords[:, i] for i, axis in enumerate(axes)}
        table.update(score=self.score, intensity=self.intensity, size=self.size)
        return table

    def to_csv(self, path: str | os.PathLike) -> None:
        """Writes as_table() with a header row."""
        table = self.as_table()
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(table)
            writer.writerows(zip(*(column.tolist() for column in table.values())))


def detect_spots(
    enhanced,
    raw=None,
    method: str | None = None,
    threshold: float | None = None,
    min_distance: float | None = None,
    scales=None,
    sensitivities=None,
    subpixel: str | None = None,
    merge_radius: float | None = None,
    *,
    footprint_radius: int | None = None,
    window_radius: int | None = None,
    params: DetectionParams = DEFAULT_DETECTION,
    stack: str = "zstack",
    cancel=None,
) -> Spots:
    """Detects spots in a 2D image (y, x), a z-stack (z, y, x) or a larger stack (..., y, x).

    enhanced: the image to detect on (the network's output, values in [0, 1]; any real dtype).
    raw: optional image of the same shape, only sampled for `intensity`.
    method: "peak": pixels above `threshold` that are the maximum of their
        (2 * footprint_radius + 1)^2 neighbourhood, strongest first, dropping any within
        `min_distance` px (inclusive) of a stronger one (0 keeps all).
        "wavelet": Icy's detector; `scales` (1..5) and `sensitivities` (> 0, higher finds more;
        one number applies to every scale). The image needs sides >= 2^(max scale + 1) + 1.
    subpixel: "none" (peak pixel / component centroid), "centroid" (intensity-weighted, background
        subtracted) or "gaussian" (2D Gaussian fit, the centroid where it diverges), both in the
        (2 * window_radius + 1)^2 window around the brightest pixel.
    merge_radius: z-stacks: spots of adjacent planes within this many px are one molecule, kept
        at its strongest plane.
    stack: for 3 or more dimensions: "zstack" (the last three axes are a z-stack, detected once per
        index of the leading axes, e.g. each time point or channel of (T, Z, Y, X)) or "planes"
        (every (y, x) plane on its own, e.g. a time series (T, Y, X)). coords then have one column
        per axis of the image (Spots.axes names them).
    cancel: called between z-stacks or planes of a larger stack; True stops with errors.Cancelled.
    Every argument left as None comes from `params` (DEFAULT_DETECTION).
    """
    overrides = dict(method=method, threshold=threshold, min_distance=min_distance, scales=scales,
                     sensitivities=sensitivities, subpixel=subpixel, merge_radius=merge_radius,
                     footprint_radius=footprint_radius, window_radius=window_radius)
    p = dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})
    if p.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {p.method!r}")
    if p.subpixel not in SUBPIXEL_MODES:
        raise ValueError(f"subpixel must be one of {SUBPIXEL_MODES}, not {p.subpixel!r}")
    if stack not in STACK_MODES:
        raise ValueError(f"stack must be one of {STACK_MODES}, not {stack!r}")
    enhanced, raw = _as_array(enhanced, "enhanced"), None if raw is None else _as_array(raw, "raw")
    if raw is not None and raw.shape != enhanced.shape:
        raise ValueError(f"raw has shape {raw.shape}, enhanced has {enhanced.shape}; they must match")
    detect_plane = _plane_detector(p)
    unit = 3 if stack == "zstack" and enhanced.ndim >= 3 else 2
    if enhanced.ndim == unit:
        return _detect_unit(detect_plane, enhanced, raw, p.merge_radius)
    lead = enhanced.ndim - unit
    coords, columns = [], {"score": [], "intensity": [], "size": []}
    for index in np.ndindex(*enhanced.shape[:lead]):
        if cancel is not None and cancel():
            raise Cancelled("detection cancelled")
        try:
            spots = _detect_unit(detect_plane, enhanced[index], None if raw is None else raw[index], p.merge_radius)
        except ValueError as e:
            raise ValueError(f"stack index {index}: {e}") from None
        coords.append(np.concatenate([np.broadcast_to(np.asarray(index, float), (len(spots), lead)), spots.coords], 1))
        for name, values in columns.items():
            values.append(getattr(spots, name))
    axes = tuple(f"axis{i}" for i in range(lead)) + ("z", "y", "x")[-unit:]
    return Spots(coords=np.concatenate(coords), axes=axes,
                 **{name: np.concatenate(values) for name, values in columns.items()})


def _detect_unit(detect_plane, enhanced: np.ndarray, raw: np.ndarray | None, merge_radius: float) -> Spots:
    """The spots of one 2D plane or one z-stack."""
    stack = _as_float32(enhanced, "enhanced")
    raw_stack = None if raw is None else _as_float32(raw, "raw")
    if stack.ndim == 2:
        return _to_spots(detect_plane(stack, raw_stack), ndim=2)
    raw_planes = [None] * len(stack) if raw_stack is None else list(raw_stack)

    def detect_numbered(z):
        try:
            rows = detect_plane(stack[z], raw_planes[z])
        except ValueError as e:
            raise ValueError(f"plane {z}: {e}") from None
        rows[:, _Z] = z
        return rows

    # the C core releases the GIL, so planes run in parallel
    with ThreadPoolExecutor(max_workers=min(len(stack), os.cpu_count() or 1)) as pool:
        rows = np.concatenate(list(pool.map(detect_numbered, range(len(stack)))))
    return _to_spots(_core.merge_plane_spots(rows, float(merge_radius)), ndim=3)


def _as_array(image, name: str) -> np.ndarray:
    """`image` as an array of real numbers with at least two axes (not converted: a large stack is
    converted one plane or z-stack at a time)."""
    array = np.asarray(image)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name} must be an array of real numbers, not {array.dtype}")
    if array.ndim < 2:
        raise ValueError(f"{name} must be 2D (y, x), a z-stack (z, y, x) or a stack (..., y, x), got shape "
                         f"{array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return array


def _as_float32(array: np.ndarray, name: str) -> np.ndarray:
    # NaN and infinities are reported by the C core with their position
    return np.ascontiguousarray(array, dtype=np.float32)


def _plane_detector(p: DetectionParams):
    """A function (plane, raw_plane or None) -> float32 rows [n, 6] from the C core."""
    if p.method == "peak":
        return lambda plane, raw: _core.detect_peaks(
            plane, raw, float(p.threshold), int(p.footprint_radius), float(p.min_distance), p.subpixel,
            int(p.window_radius))
    scales = np.atleast_1d(p.scales)
    if not np.issubdtype(scales.dtype, np.integer):
        raise TypeError(f"scales must be integers, got {p.scales!r}")
    sensitivities = np.atleast_1d(np.asarray(p.sensitivities, dtype=float))
    if sensitivities.size == 1:
        sensitivities = np.repeat(sensitivities, scales.size)
    scales, sensitivities = scales.tolist(), sensitivities.tolist()
    return lambda plane, raw: _core.detect_wavelet(plane, raw, scales, sensitivities, p.subpixel,
                                                   int(p.window_radius))


def _to_spots(rows: np.ndarray, ndim: int) -> Spots:
    coords = rows[:, [_Y, _X]] if ndim == 2 else rows[:, [_Z, _Y, _X]]
    return Spots(coords=coords.astype(np.float64), score=rows[:, _SCORE].astype(np.float64),
                 intensity=rows[:, _INTENSITY].astype(np.float64), size=rows[:, _SIZE].astype(np.float64))
