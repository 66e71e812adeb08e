"""Training DeepSpot on annotated images: `fit` (and `Model.fit`, which calls it).

Every numeric step of training runs in the C core (its Trainer, on the model's device and
precision: forward in training mode, loss, backward, Adam; csrc/train.c); this module prepares
the data (crops, targets), splits off validation, runs the epochs, validates (loss and
detection F1), checkpoints, resumes and stops early. docs/reference_model.md sections 2-3 give the
recipe it follows; the defaults are for fine-tuning on a user's few annotations (docs/training.md).

Data: the annotated areas (whole images, or the rectangles of `regions`); each training epoch
draws random crops of them (turned, flipped and offset in background at random), each crop
divided by its own maximum; its target e(X) is the crop on the 0..255 scale with the 3x3 stamp
[[200,230,200],[230,255,230],[200,230,200]] written at every annotated spot, then divided by its
own maximum (as the authors' dataset.py and simulate.make_target). Validation tiles its areas.
Fine-tuning keeps the batch norms frozen (their moving statistics, in training too): on batch
statistics the moving statistics drift away from what the weights learn and inference falls apart.

Determinism and resuming: every random choice is a function of `seed` and the epoch (shuffling,
the validation split, simulated images) or of `seed` and the step count (dropout masks, in C). A
checkpoint after each epoch holds the weights, the Adam moments and step count, and a state file
(epoch, history, early-stopping state); a run that is interrupted - even mid-epoch - and started
again with resume=True continues from the last complete epoch and ends with the same weights as
an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import Cancelled
from .safetensors_io import save_safetensors

__all__ = ["fit", "check_fit_options", "stack_training_pairs", "History", "initial_parameters", "make_training_pair", "save_training_curves", "annotation_gaps",
           "IncompleteAnnotationWarning", "STATE_FILE", "BEST_WEIGHTS"]

STAMP = np.array([[200, 230, 200], [230, 255, 230], [200, 230, 200]], dtype=np.float32)
STATE_FILE = "state.json"
BEST_WEIGHTS = "best.safetensors"
CURVES_FILE = "curves.png"
STATE_FORMAT = "deepspot-napari-training/4"  # 4: frozen batch norms, early stopping on the validation loss
SIZE_MULTIPLE = 8
MIN_PATCH = 32            # the smallest crop (and validation strip) side: 4 cells at the trunk's 1/8 resolution
# Defaults for fine-tuning on a few annotated images, measured on a real annotated smFISH image
# (docs/training.md): 128 px crops in batches of 8, epochs of at least 10 steps, 30 epochs at most
# (about 5 minutes on a 2-core CPU), stopping after 10 epochs without a better validation loss.
DEFAULT_PATCH_SIZE = 128
DEFAULT_EPOCHS = 30
DEFAULT_PATIENCE = 10
DEFAULT_TRAINING_BATCH_SIZE = 8
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_VALIDATION_SPLIT = 0.2
DEFAULT_DROPOUT = 0.2
MIN_EPOCH_STEPS = 10
WHOLE_AREA_SPLIT = 5      # from this many annotated areas on, validation holds out whole areas
# An annotated area looks incompletely annotated when the model finds more than
# max(GAP_MIN_COUNT, GAP_FRACTION x annotations) spots scoring >= GAP_SCORE without an annotation.
GAP_SCORE = 0.9
GAP_MIN_COUNT = 5
GAP_FRACTION = 0.25
OFFSET_JITTER = 0.2       # augment: the largest background offset added, as a fraction of the crop's maximum


@dataclass
class History:
    """Per-epoch records (lists aligned by epoch) and how the run ended."""

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)          # mean training loss over the epoch's steps
    bce: list[float] = field(default_factory=list)
    max_term: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)      # inference mode (moving statistics)
    val_f1: list[float] = field(default_factory=list)        # detection F1 pooled over the validation areas (nearest, 3 px)
    val_precision: list[float] = field(default_factory=list)
    val_recall: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_monitor: list[float] | None = None                  # what picked best_epoch: [-F1, loss] or [loss]
    warnings: list[str] = field(default_factory=list)        # e.g. incomplete annotations found before training
    stopped_early: bool = False
    steps: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})


class ResumeMismatch(ValueError):
    """A run to resume was made with other settings or data than this call's (`differences` says which)."""

    def __init__(self, checkpoint_dir, differences: str):
        super().__init__(f"cannot resume from {checkpoint_dir}: the run there used other settings or data "
                         f"({differences}); use another checkpoint_dir or resume=False")
        self.differences = differences


# ---------------------------------------------------------------------------------------------- data

def _check_image(image, index: int) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype.kind not in "uif":
        raise TypeError(f"image {index}: dtype {a.dtype} is not a real number type")
    if a.ndim != 2:
        raise ValueError(f"image {index}: expected a 2D array (y, x), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"image {index} is empty")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"image {index} holds NaN or Inf values")
    if a.min() < 0:
        raise ValueError(f"image {index} has negative values; expected intensities >= 0")
    if a.max() <= 0:
        raise ValueError(f"image {index} has maximum {a.max()}: nothing to scale by")
    return a


def _check_points(points, shape, index: int) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0:
        return np.zeros((0, 2))
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points {index}: expected an (n, 2) array of (y, x), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"points {index} hold NaN or Inf values")
    r = np.rint(p)
    outside = (r[:, 0] < 0) | (r[:, 0] > shape[0] - 1) | (r[:, 1] < 0) | (r[:, 1] > shape[1] - 1)
    if np.any(outside):
        k = int(np.argmax(outside))
        raise ValueError(f"points {index}: {int(outside.sum())} point(s) outside the {shape[0]}x{shape[1]} image, "
                         f"e.g. (y, x) = ({p[k, 0]:g}, {p[k, 1]:g}); points are (y, x) in pixels, 0-based")
    return p


def make_training_pair(image: np.ndarray, points: np.ndarray,
                       target_background: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) float32 for one image: the image divided by its maximum, and e(X): the
    3x3 STAMP at every point (where stamps overlap the larger value wins) on the input's 0..255
    scale. target_background None: the paper's e(X) (docs/reference_model.md section 3: the background kept
    as it is, the target divided by its own maximum). A level b in (0, 1]: the background scaled to
    b of the input and the target divided by 255, so that stamps are 1 and the background stays at
    most b, also without spots (with the paper's e(X) a spot-free crop's brightest pixel is a
    target of 1: a detection)."""
    image = np.asarray(image, np.float32)
    peak = float(image.max())
    x = image / np.float32(peak)
    target = x * np.float32(255.0 if target_background is None else 255.0 * target_background)
    if len(points):
        yx = np.rint(np.asarray(points, np.float64)).astype(np.int64)
        stamp = np.full(image.shape, -1.0, np.float32)
        h, w = image.shape
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ys, xs = yx[:, 0] + dy, yx[:, 1] + dx
                ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
                np.maximum.at(stamp, (ys[ok], xs[ok]), STAMP[dy + 1, dx + 1])
        target = np.where(stamp >= 0, stamp, target)
    scale = target.max() if target_background is None else np.float32(255.0)
    return x, (target / scale).astype(np.float32)


def _patch_starts(length: int, patch: int) -> list[int]:
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, patch))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def _patches(image: np.ndarray, points: np.ndarray, height: int, width: int):
    """Yields (patch image, points in patch coordinates) of height x width patches covering the
    image (the last row and column of patches aligned to its end); height and width <= its sides."""
    r = np.rint(points) if len(points) else np.zeros((0, 2))
    for y0 in _patch_starts(image.shape[0], height):
        for x0 in _patch_starts(image.shape[1], width):
            inside = (r[:, 0] >= y0) & (r[:, 0] < y0 + height) & (r[:, 1] >= x0) & (r[:, 1] < x0 + width)
            yield image[y0:y0 + height, x0:x0 + width], points[inside] - np.array([y0, x0], np.float64)


@dataclass
class _Data:
    x: np.ndarray          # [n, p, p] float32 inputs
    t: np.ndarray          # [n, p, p] float32 targets
    points: list           # (k, 2) per patch
    sources: np.ndarray    # [n] the index of the image each patch was cut from

    def join(self, other: "_Data") -> "_Data":
        return _Data(np.concatenate([self.x, other.x]), np.concatenate([self.t, other.t]), self.points + other.points,
                     np.concatenate([self.sources, other.sources]))

    def __len__(self) -> int:
        return len(self.x)


def _tiles(areas: Sequence["_Area"], patch: int, target_background: float | None) -> list[_Data]:
    """The patches tiling each area (each scaled by its own maximum, with its target), at most
    patch x patch and never padded (a narrow validation strip gets narrow tiles): what the
    validation loss is computed on. One _Data per area (tiles of one area share a shape)."""
    return [_area_tiles(area, patch, target_background) for area in areas]


def _area_tiles(area: "_Area", patch: int, target_background: float | None) -> _Data:
    xs, ts, ps, sources = [], [], [], []
    h, w = (min(patch, n // SIZE_MULTIPLE * SIZE_MULTIPLE) for n in area.shape)
    for tile, tile_points in _patches(area.image, area.points, h, w):
        if tile.max() <= 0:
            continue  # an empty (all-zero) patch has nothing to scale by
        x, t = make_training_pair(tile, tile_points, target_background)
        xs.append(x)
        ts.append(t)
        ps.append(tile_points)
        sources.append(area.source)
    if not xs:
        return _Data(np.zeros((0, h, w), np.float32), np.zeros((0, h, w), np.float32), [], np.zeros(0, int))
    return _Data(np.stack(xs), np.stack(ts), ps, np.array(sources))


@dataclass
class _Area:
    """One annotated area: a whole image, or the rectangle of an image in which every spot is
    marked (partial annotation). Only its pixels are trained or validated on."""
    image: np.ndarray      # float32 pixels of the area
    points: np.ndarray     # (k, 2) annotations in area coordinates
    source: int            # index of the image it comes from
    origin: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def part(self, axis: int, start: int, stop: int) -> "_Area":
        """The sub-area [start, stop) along axis (0: rows, 1: columns)."""
        index = [slice(None), slice(None)]
        index[axis] = slice(start, stop)
        r = np.rint(self.points)
        keep = (r[:, axis] >= start) & (r[:, axis] < stop)
        shift = np.zeros(2)
        shift[axis] = start
        origin = list(self.origin)
        origin[axis] += start
        return _Area(self.image[tuple(index)], self.points[keep] - shift, self.source, (origin[0], origin[1]))


def _check_regions(regions, index: int, shape) -> list[tuple[int, int, int, int]]:
    """An image's annotated rectangles (y0, x0, y1, x1), end-exclusive; None means the whole image."""
    if regions is None:
        return [(0, 0, shape[0], shape[1])]
    r = np.asarray(regions, dtype=np.float64)
    if r.ndim == 1:
        r = r[None]
    if r.ndim != 2 or r.shape[1] != 4 or len(r) == 0:
        raise ValueError(f"regions {index}: expected a rectangle (y0, x0, y1, x1) or a list of them, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"regions {index} hold NaN or Inf values")
    out = []
    for y0, x0, y1, x1 in np.rint(r).astype(int):
        if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
            raise ValueError(f"regions {index}: rectangle (y0, x0, y1, x1) = ({y0}, {x0}, {y1}, {x1}) is empty or "
                             f"not inside the {shape[0]}x{shape[1]} image")
        out.append((int(y0), int(x0), int(y1), int(x1)))
    return out


def _prepare_areas(images: Sequence, points: Sequence, regions: Sequence | None) -> list[_Area]:
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images, points = [images], [points]
        regions = None if regions is None else [regions]
    images, points = list(images), list(points)
    if len(images) != len(points):
        raise ValueError(f"got {len(images)} images but {len(points)} point lists; give one (n, 2) array of "
                         "(y, x) points per image")
    if not images:
        raise ValueError("no training images given")
    if regions is not None and len(regions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(regions)} region entries; give one per image (None: "
                         "the whole image is annotated)")
    areas = []
    for i, (image, pts) in enumerate(zip(images, points)):
        image = _check_image(image, i)
        pts = _check_points(pts, image.shape, i)
        r = np.rint(pts) if len(pts) else np.zeros((0, 2))
        for y0, x0, y1, x1 in _check_regions(None if regions is None else regions[i], i, image.shape):
            crop = image[y0:y1, x0:x1]
            if crop.max() <= 0:
                continue  # an all-zero area has nothing to scale by
            inside = (r[:, 0] >= y0) & (r[:, 0] < y1) & (r[:, 1] >= x0) & (r[:, 1] < x1)
            areas.append(_Area(crop, pts[inside] - np.array([y0, x0], np.float64), i, (y0, x0)))
    if not areas:
        raise ValueError("no usable training data (every image or region is all zero)")
    return areas


def _split_validation(areas: list[_Area], fraction: float, seed: int) -> tuple[list[_Area], list[_Area]]:
    """(training areas, validation areas). With WHOLE_AREA_SPLIT or more areas, whole areas are held
    out (seeded order) until about `fraction` of the pixels, so that nothing validated has a
    neighbour in training; with fewer, a strip of `fraction` of each area along one edge is held
    out (of the four edges, the one holding the share of the annotations closest to `fraction`,
    one without annotations only as a last resort),
    so that a single annotated image or region still validates on pixels it never trained on.
    Raises when the split would leave either side too small to use."""
    if fraction == 0:
        return areas, []
    if len(areas) >= WHOLE_AREA_SPLIT:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11]))
        sizes = np.array([a.image.size for a in areas], float)
        wanted, held = fraction * sizes.sum(), np.zeros(len(areas), bool)
        for k in rng.permutation(len(areas))[:-1]:  # at least one area always trains
            if held.any() and abs(sizes[held].sum() + sizes[k] - wanted) > abs(sizes[held].sum() - wanted):
                break
            held[k] = True
        return [a for a, h in zip(areas, held) if not h], [a for a, h in zip(areas, held) if h]
    train, val = [], []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5721]))
    for area in areas:
        # the four edge strips: (axis, at the far end?); the one whose share of the annotations is
        # closest to `fraction` validates, so that it is as representative as a strip can be; a strip
        # without any annotated spot (in an area that has some) only when no other fits: its F1
        # would score nothing
        choices = []
        for axis in (0, 1):
            length = area.shape[axis]
            width = int(round(fraction * length))
            if width < MIN_PATCH or length - width < MIN_PATCH:
                continue
            for far in (False, True):
                start, stop = (length - width, length) if far else (0, width)
                r = np.rint(area.points[:, axis]) if len(area.points) else np.zeros(0)
                share = np.mean((r >= start) & (r < stop)) if len(r) else fraction
                choices.append((len(r) > 0 and share == 0, abs(share - fraction), rng.random(), axis, start, stop))
        if not choices:
            raise ValueError(f"validation_split={fraction:g} of an annotated area of {area.shape[0]}x{area.shape[1]} px "
                             f"leaves too little on one side: the validation strip and the rest each need at least "
                             f"{MIN_PATCH} px; annotate a larger area, change validation_split, or set it to 0 "
                             "(no validation, no early stopping)")
        *_, axis, start, stop = min(choices)
        length = area.shape[axis]
        val.append(area.part(axis, start, stop))
        train.append(area.part(axis, stop, length) if start == 0 else area.part(axis, 0, start))
    return train, val


def _patch_side(areas: Sequence[_Area], patch_size: int) -> int:
    """The training patch side: patch_size, or the smallest training area's side rounded down to a
    multiple of 8 when that is smaller (a crop never leaves its area)."""
    smallest = min(min(a.shape) for a in areas)
    side = min(patch_size, smallest // SIZE_MULTIPLE * SIZE_MULTIPLE)
    if side < MIN_PATCH:
        raise ValueError(f"an annotated area of {smallest} px is too small to train on: each image or region needs "
                         f"sides of at least {MIN_PATCH} px")
    return side


def _crops(areas: Sequence[_Area], n: int, patch: int, rng: np.random.Generator, augment: bool,
           target_background: float | None) -> _Data:
    """n random patch x patch crops of the areas (an area is picked in proportion to its pixels),
    each scaled by its own maximum with its target; with augment, each is turned by one of the 8
    rotations/reflections of the square and, half of the time, given a uniform background offset
    of up to 20 % of its maximum (dimmer spots on a brighter background) before scaling."""
    sizes = np.array([a.image.size for a in areas], float)
    which = rng.choice(len(areas), size=n, p=sizes / sizes.sum())
    xs, ts, ps, sources = [], [], [], []
    for k in which:
        area = areas[k]
        h, w = area.shape
        for _ in range(100):  # an all-zero crop has nothing to scale by: draw another
            y0, x0 = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
            tile = area.image[y0:y0 + patch, x0:x0 + patch]
            if tile.max() > 0:
                break
        else:
            raise ValueError(f"image {area.source}: its annotated area is almost all zero; nothing to train on")
        r = np.rint(area.points) if len(area.points) else np.zeros((0, 2))
        inside = (r[:, 0] >= y0) & (r[:, 0] < y0 + patch) & (r[:, 1] >= x0) & (r[:, 1] < x0 + patch)
        pts = area.points[inside] - np.array([y0, x0], np.float64)
        if augment:
            turns, flip, offset = int(rng.integers(4)), bool(rng.integers(2)), rng.random()
            if offset < 0.5:
                tile = tile + np.float32(offset * 2 * OFFSET_JITTER * float(tile.max()))
            tile = np.rot90(tile, turns)
            pts = _rotate_points(pts, patch, turns)
            if flip:
                tile = tile[:, ::-1]
                pts = pts * [1, -1] + [0, patch - 1]
        x, t = make_training_pair(np.ascontiguousarray(tile), pts, target_background)
        xs.append(x)
        ts.append(t)
        ps.append(pts)
        sources.append(area.source)
    return _Data(np.stack(xs), np.stack(ts), ps, np.array(sources))


def _rotate_points(points: np.ndarray, side: int, turns: int) -> np.ndarray:
    """Points (y, x) of a side x side patch after np.rot90(patch, turns) (counter-clockwise)."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    for _ in range(turns % 4):
        p = np.stack([side - 1 - p[:, 1], p[:, 0]], axis=1)
    return p


def _simulated(n: int, patch: int, seed: int, epoch: int, target_background: float | None) -> _Data:
    from .simulate import simulate_image
    xs, ts, ps = [], [], []
    children = np.random.SeedSequence([seed, epoch, 0x51]).spawn(n)
    for child in children:
        image, spots = simulate_image(np.random.default_rng(child), recipe="hybrid", size=patch)
        x, t = make_training_pair(image.astype(np.float32), spots, target_background)
        xs.append(x)
        ts.append(t)
        ps.append(spots)
    return _Data(np.stack(xs), np.stack(ts), ps, -1 - np.arange(n))  # each its own image, apart from the user's


def _fingerprint(areas: Sequence[_Area]) -> str:
    h = hashlib.sha256()
    for area in areas:
        h.update(repr((area.source, area.origin, area.shape)).encode())
        h.update(np.ascontiguousarray(area.image).tobytes())
        h.update(np.ascontiguousarray(area.points, np.float64).tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- init

def initial_parameters(trainer, seed: int) -> dict[str, np.ndarray]:
    """Keras' default initialisation of the architecture (what a from-scratch run of the authors'
    code starts from): Conv2D kernels Glorot-uniform, the up-blocks' main-path Conv2DTranspose
    kernels He-normal (truncated at 2 sd), biases 0; BN gamma 1, beta 0, moving mean 0, variance 1.
    Fans are Keras': (kh, kw, in, out) for Conv2D, (kh, kw, out, in) for Conv2DTranspose."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A17]))
    out = {}
    for name in trainer.names:
        shape = trainer.get(name).shape
        if name.endswith(".weight"):
            o, i, kh, kw = shape
            transposed = ".convt" in name or ".shortcut.convt" in name
            fan_in, fan_out = (o * kh * kw, i * kh * kw) if transposed else (i * kh * kw, o * kh * kw)
            if transposed and ".shortcut." not in name:
                sd = math.sqrt(2.0 / fan_in) / 0.87962566103423978
                w = rng.standard_normal(shape)
                bad = np.abs(w) > 2
                while bad.any():
                    w[bad] = rng.standard_normal(int(bad.sum()))
                    bad = np.abs(w) > 2
                out[name] = (w * sd).astype(np.float32)
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                out[name] = rng.uniform(-limit, limit, shape).astype(np.float32)
        elif name.endswith((".gamma", ".moving_variance")):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


# ---------------------------------------------------------------------------------------------- checkpoints

def _save_weights(trainer, path: Path, with_optimizer: bool, metadata: dict | None = None) -> None:
    tensors = {name: trainer.get(name) for name in trainer.names}
    if with_optimizer:
        for name in trainer.names:
            if ".moving_" not in name:
                tensors["adam.m." + name] = trainer.get("adam.m." + name)
                tensors["adam.v." + name] = trainer.get("adam.v." + name)
    meta = {"format": "deepspot-napari/1", "architecture": "deepspot-reference"}
    meta.update(metadata or {})
    save_safetensors(path, tensors, {k: str(v) for k, v in meta.items()})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- validation

def _validate(trainer, model, tiles: Sequence[_Data], areas: Sequence[_Area], batch_size: int,
              detection) -> tuple[float, float, float, float]:
    """(loss, F1, precision, recall) on the validation areas, in inference mode: the loss over the
    patches tiling them; the detection scores from enhancing each whole area with the network as it
    is now (exactly what Model.enhance would give) and detecting with `detection` (fit passes the
    model's own defaults unless told otherwise), pooled over the areas (nearest match within 3 px)."""
    from .detect import detect_spots
    from .metrics import MatchCounts, match_nearest
    if not areas:
        return math.nan, math.nan, math.nan, math.nan
    total, count = 0.0, 0
    for data in tiles:
        for start in range(0, len(data), batch_size):
            x, t = data.x[start:start + batch_size], data.t[start:start + batch_size]
            total += trainer.evaluate(x, t)[1][0] * len(x)
            count += len(x)
    current = type(model)(trainer.to_network(), model.path, model.device, model.metadata)
    tp = fp = fn = ambiguous = 0
    for area in areas:
        spots = detect_spots(current.enhance(area.image), params=detection)
        counts = match_nearest(area.points, spots.coords)
        tp, fp, fn, ambiguous = tp + counts.tp, fp + counts.fp, fn + counts.fn, ambiguous + counts.ambiguous
    pooled = MatchCounts(tp=tp, fp=fp, fn=fn, ambiguous=ambiguous)
    return total / max(count, 1), pooled.f1, pooled.precision, pooled.recall


class IncompleteAnnotationWarning(UserWarning):
    """The annotated area holds many strong spots that are not annotated: training would teach
    the network that they are background."""


def annotation_gaps(model, areas: Sequence[_Area], detection=None, min_score: float = GAP_SCORE) -> list[str]:
    """One message per area whose annotations look incomplete: the model (before training) finds
    more than max(GAP_MIN_COUNT, GAP_FRACTION x the annotations) spots scoring >= min_score with no
    annotation within 3 px. Unannotated spots inside an annotated area are taught as background."""
    from .detect import detect_spots
    from scipy.spatial import cKDTree
    messages = []
    for area in areas:
        spots = detect_spots(model.enhance(area.image), params=model.detection if detection is None else detection)
        strong = spots.coords[spots.score >= min_score]
        if len(strong) and len(area.points):
            strong = strong[cKDTree(area.points).query(strong, k=1)[0] > 3.0]
        if len(strong) > max(GAP_MIN_COUNT, GAP_FRACTION * len(area.points)):
            y0, x0 = area.origin
            messages.append(
                f"image {area.source}, area from (y, x) = ({y0}, {x0}), {area.shape[0]}x{area.shape[1]} px: the "
                f"current model finds {len(strong)} strong spots there that have no annotation within 3 px "
                f"({len(area.points)} annotated), e.g. at (y, x) = ({strong[0][0] + y0:.0f}, {strong[0][1] + x0:.0f}). "
                "Every unannotated spot inside an annotated area is taught as background: annotate them, or "
                "limit training to the part you annotated completely (regions)")
    return messages


# ---------------------------------------------------------------------------------------------- fit

def _diverged(trainer) -> bool:
    """Whether a parameter or an Adam moment is no longer finite."""
    return not all(np.isfinite(trainer.get(prefix + name)).all()
                   for name in trainer.names for prefix in ("", "adam.m.", "adam.v."))


def stack_training_pairs(stack, points) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """fit's (images, points) of an annotated stack: `stack` (..., Y, X; any array-like with a shape,
    e.g. a Zarr or Dask array, read one plane at a time) and `points` (n, stack's ndim) positions in
    its pixels. Each point belongs to the plane of its rounded leading coordinates; only planes with
    at least one point are kept (an unannotated plane of a partly annotated stack would teach "no
    spots here"), in index order, each with its points' (y, x). A 2D image is its own single pair."""
    shape = tuple(np.shape(stack))
    points = np.asarray(points, dtype=float)
    if len(shape) < 2:
        raise ValueError(f"stack has shape {shape}; expected an image (Y, X) or a stack (..., Y, X)")
    if points.size == 0:
        points = points.reshape(0, len(shape))
    if points.ndim != 2 or points.shape[1] != len(shape):
        raise ValueError(f"points have shape {points.shape}; a stack of shape {shape} needs (n, {len(shape)}) "
                         "positions, one column per axis")
    if len(shape) == 2:
        return [np.asarray(stack)], [points]
    lead = np.clip(np.round(points[:, :-2]), 0, np.asarray(shape[:-2]) - 1).astype(int)
    images, plane_points = [], []
    for index in sorted(set(map(tuple, lead.tolist()))):
        in_plane = np.all(lead == np.asarray(index), axis=1)
        images.append(np.asarray(stack[index]))
        plane_points.append(points[in_plane][:, -2:])
    return images, plane_points


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_fit_options(*, epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_TRAINING_BATCH_SIZE,
                      learning_rate: float = DEFAULT_LEARNING_RATE, validation_split: float = DEFAULT_VALIDATION_SPLIT,
                      max_term: str = "batch", dropout: float = DEFAULT_DROPOUT, patch_size: int = DEFAULT_PATCH_SIZE,
                      simulate: int = 0, patience: int = DEFAULT_PATIENCE, monitor: str = "loss",
                      batch_norm: str | None = None, steps_per_epoch: int | None = None) -> None:
    """Raises ValueError, saying what is allowed, for a fit option out of range: fit's own check,
    for callers (the Train widget) that want to refuse bad values before starting a run."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (_is_number(validation_split) and 0 <= validation_split < 1):
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if max_term not in ("batch", "per_image", "none"):
        raise ValueError(f"max_term must be 'batch', 'per_image' or 'none', got {max_term!r}")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not (_is_number(learning_rate) and learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if patch_size < MIN_PATCH or patch_size % SIZE_MULTIPLE:
        raise ValueError(f"patch_size must be a multiple of {SIZE_MULTIPLE} and at least {MIN_PATCH}, got {patch_size}")
    if simulate < 0 or patience < 0:
        raise ValueError("simulate and patience must be >= 0")
    if monitor not in ("f1", "loss"):
        raise ValueError(f"monitor must be 'f1' or 'loss', got {monitor!r}")
    if batch_norm not in (None, "frozen", "batch"):
        raise ValueError(f"batch_norm must be 'frozen', 'batch' or None (the default for the device), got {batch_norm!r}")
    if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or steps_per_epoch < 1):
        raise ValueError(f"steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")


def fit(model, images=(), points=(), *, epochs: int = DEFAULT_EPOCHS,
        batch_size: int = DEFAULT_TRAINING_BATCH_SIZE, learning_rate: float = DEFAULT_LEARNING_RATE,
        validation_split: float = DEFAULT_VALIDATION_SPLIT, seed: int = 0, max_term: str = "batch",
        dropout: float = DEFAULT_DROPOUT, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
        patience: int = DEFAULT_PATIENCE, progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None, simulate: int = 0, patch_size: int = DEFAULT_PATCH_SIZE,
        from_scratch: bool = False, bn_bessel: bool = False, detection=None, on_epoch: Callable[[dict], None] | None = None,
        return_trainer: bool = False, regions: Sequence | None = None, augment: bool = True, monitor: str = "loss",
        steps_per_epoch: int | None = None, check_annotations: bool = True, batch_norm: str | None = None,
        validation: tuple[Sequence, Sequence] | None = None, target_background: float | str = "model"):
    """Trains the network on `images` (2D arrays, any size) annotated with `points` ((n, 2) arrays of
    (y, x) pixel positions, one per image) and returns a History (and the trainer if
    return_trainer; `trainer.to_network()` gives the trained inference network).

    The defaults are for fine-tuning on a few annotated images (a few minutes on a 2-core CPU):
    random patch_size crops of the annotated areas, turned and flipped at random, with a random
    background offset half of the time (augment); frozen batch norms; early stopping on the loss of
    a held-out part of the annotated area; the best epoch's weights kept.

    model: a Model (Model.load; training runs on its device and precision, and leaves it as it is:
    Model.fit is the call that keeps the result); from_scratch=True replaces its weights by Keras'
    default initialisation (seeded).
    regions: partial annotation. None (every image fully annotated), or one entry per image: None,
    a rectangle (y0, x0, y1, x1) (end-exclusive pixels), or a list of rectangles: only there were
    all spots marked, so only there is trained and validated (crops never leave a rectangle, so
    unmarked spots outside it cost nothing).
    epochs, batch_size, learning_rate (Adam, beta 0.9/0.999, epsilon 1e-7), dropout (spatial dropout
    rate), max_term ("batch": the authors' code, "per_image": the paper, "none"): the recipe.
    steps_per_epoch: None = enough crops to cover the training areas once, and at least
    MIN_EPOCH_STEPS steps (so that validation does not dominate on small annotations).
    bn_bessel: the BN moving variance takes the unbiased batch variance (TF 2.x's fused batch norm,
    which trained the published weights) instead of the biased one (Keras 3, the default).
    batch_norm: "frozen" (every batch norm normalises with its moving statistics in training too and
    keeps them: the network trained is exactly the one inference runs), or "batch" (Keras' training
    mode: batch statistics, moving statistics updated with momentum 0.99). None: "frozen" when
    fine-tuning trained weights on the CPU, "batch" from scratch, with bn_bessel or on the GPU (the
    CUDA backend has no frozen batch norm yet). Fine-tuning on batch statistics drifts: after a few dozen steps
    on crops of one image the moving statistics no longer match what the weights learnt, and the
    enhanced images inference gives fall apart (docs/training.md).
    validation_split: held out for validation (_split_validation explains how: whole areas when
    there are WHOLE_AREA_SPLIT or more, else a strip at the far end of each); a split that leaves
    a side too small raises. 0: no validation (the training loss decides the best epoch).
    After each epoch: the validation loss (inference mode) and the detection F1 / precision / recall
    of the enhanced validation areas (`detection` = DetectionParams; default the fixed detector).
    monitor: "loss" (the default: with frozen batch norms the validation loss falls steadily while
    training helps, and it is far less noisy than the F1 of a strip holding a dozen spots) or "f1"
    (ties go to the lower validation loss): what picks the best epoch. patience: epochs without a
    better monitor value after which training stops (0 acts as 1); the best epoch's weights are
    restored at the end.
    check_annotations: before training, warn (IncompleteAnnotationWarning, also in
    History.warnings) where the model already finds many strong unannotated spots in an area.
    checkpoint_dir: where each epoch's checkpoint (loadable by Model.load too), the best weights
    (best.safetensors), the state file and curves.png go; with resume=True a run found there continues.
    validation: (images, points) held out for validation instead of a split of the training data
    (validation_split is then not used).
    target_background: the training target (make_training_pair): "model" (the one the weights
    were made for, Model.target_background), "paper" (the paper's e(X)) or a background level in
    (0, 1]. Saved checkpoints record it, so that a fine-tuned model keeps it.
    simulate: this many extra simulated images (simulate.simulate_image, "hybrid" recipe) join the
    training crops each epoch. patch_size: side of the training crops (a multiple of 8; smaller
    areas lower it to their side).
    progress(done, total) after each step; cancel() -> True stops with model.Cancelled (the
    checkpoint of the last complete epoch stays valid)."""
    if not callable(getattr(model, "make_trainer", None)):
        raise TypeError(f"fit trains a Model (deepspot_napari.Model.load(weights)), got {type(model).__name__}")
    check_fit_options(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                      validation_split=validation_split, max_term=max_term, dropout=dropout, patch_size=patch_size,
                      simulate=simulate, patience=patience, monitor=monitor, batch_norm=batch_norm,
                      steps_per_epoch=steps_per_epoch)
    if target_background not in ("model", "paper") and not (
            isinstance(target_background, (int, float)) and not isinstance(target_background, bool)
            and 0 < target_background <= 1):
        raise ValueError(f"target_background must be 'model', 'paper' or a level in (0, 1], got {target_background!r}")

    areas = _prepare_areas(images, points, regions)
    if validation is not None:
        if len(validation) != 2:
            raise ValueError("validation must be (images, points): the held-out annotated images and their spots")
        train, val = areas, _prepare_areas(validation[0], validation[1], None)
    else:
        train, val = _split_validation(areas, validation_split, seed)
    patch = _patch_side(train, patch_size)

    detection = model.detection if detection is None else detection
    target = {"model": model.target_background, "paper": None}.get(target_background, target_background)
    target = None if target is None else float(target)
    # what the weights were made for travels with them: the target, the base model's detection defaults
    weights_meta = {} if target is None else {"target_background": target}
    if "detection" in model.metadata:
        weights_meta["detection"] = model.metadata["detection"]
    val_tiles = _tiles(val, patch, target)
    if batch_norm is None:
        batch_norm = "batch" if from_scratch or bn_bessel or model.device == "cuda" else "frozen"
    if bn_bessel and batch_norm == "frozen":
        raise ValueError("bn_bessel changes how batch statistics update the moving variance: it needs "
                         "batch_norm='batch' (a frozen batch norm keeps its statistics)")
    trainer = model.make_trainer(learning_rate=learning_rate, dropout=dropout, max_term=max_term, seed=seed,
                                 bn_bessel=bool(bn_bessel), batch_norm=batch_norm)
    if from_scratch:
        for name, value in initial_parameters(trainer, seed).items():
            trainer.set(name, value)

    settings = dict(format=STATE_FORMAT, batch_size=int(batch_size), learning_rate=float(learning_rate),
                    validation_split=float(validation_split), seed=int(seed), max_term=max_term,
                    dropout=float(dropout), simulate=int(simulate), patch_size=int(patch),
                    from_scratch=bool(from_scratch), bn_bessel=bool(bn_bessel), augment=bool(augment),
                    monitor=monitor, steps_per_epoch=steps_per_epoch, batch_norm=batch_norm,
                    data=_fingerprint(areas), target_background=target,
                    validation=None if validation is None else _fingerprint(val))
    history = History()
    start_epoch, wait = 0, 0
    best_params: dict[str, np.ndarray] | None = None
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed = False
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        state_path = ckpt / STATE_FILE
        if resume and state_path.is_file():
            state = json.loads(state_path.read_text())
            mismatch = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
            if mismatch:
                raise ResumeMismatch(ckpt, ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in mismatch.items()))
            trainer.load(str(ckpt / state["checkpoint"]))
            trainer.step_count = int(state["step_count"])
            history = History.from_dict(state["history"])
            start_epoch, wait = int(state["epoch"]), int(state["wait"])
            resumed = True
    if check_annotations and not from_scratch and not resumed:
        history.warnings = annotation_gaps(model, areas, detection)
        for message in history.warnings:
            warnings.warn(message, IncompleteAnnotationWarning, stacklevel=2)

    tiles_per_epoch = sum(len(_patch_starts(a.shape[0], patch)) * len(_patch_starts(a.shape[1], patch)) for a in train)
    steps = steps_per_epoch or max(-(-(tiles_per_epoch + simulate) // batch_size), MIN_EPOCH_STEPS)
    total_steps = steps * epochs
    done = start_epoch * steps
    monitor_name = ("val_f1" if monitor == "f1" else "val_loss") if val else "loss"

    for epoch in range(start_epoch, epochs):
        if history.stopped_early:
            break
        began = time.perf_counter()
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED]))
        # user crops fill what the simulated images leave of the epoch's steps x batch_size samples
        epoch_data = _crops(train, max(steps * batch_size - simulate, 1), patch, rng, augment, target)
        if simulate:
            epoch_data = epoch_data.join(_simulated(simulate, patch, seed, epoch, target))
        perm = rng.permutation(len(epoch_data))
        sums = np.zeros(3)
        for b in range(steps):
            idx = np.sort(perm[b * batch_size:(b + 1) * batch_size])
            sums += trainer.step(np.ascontiguousarray(epoch_data.x[idx]), np.ascontiguousarray(epoch_data.t[idx]))
            done += 1
            if progress is not None:
                progress(done, total_steps)
            if cancel is not None and cancel():
                raise Cancelled(f"training cancelled in epoch {epoch + 1}")
        means = sums / steps
        if _diverged(trainer):
            # a step whose loss was finite can still overflow the gradients: nothing of this epoch is kept
            message = (f"training diverged in epoch {epoch + 1} (the gradients overflowed): the learning rate "
                       f"{learning_rate:g} is too high for these data; lower it")
            if history.best_epoch is None:
                raise ValueError(message)
            warnings.warn(f"{message}; keeping epoch {history.best_epoch}", RuntimeWarning, stacklevel=2)
            history.warnings.append(f"{message}; kept epoch {history.best_epoch}")
            history.stopped_early = True
            break
        val_loss, val_f1, val_p, val_r = _validate(trainer, model, val_tiles, val, batch_size, detection)
        history.epoch.append(epoch + 1)
        history.loss.append(float(means[0]))
        history.bce.append(float(means[1]))
        history.max_term.append(float(means[2]))
        history.val_loss.append(val_loss)
        history.val_f1.append(val_f1)
        history.val_precision.append(val_p)
        history.val_recall.append(val_r)
        history.seconds.append(time.perf_counter() - began)
        history.steps = trainer.step_count
        # a key that is smaller when better: (-F1, loss) for "f1", the loss alone for "loss"
        key = ([-val_f1, val_loss] if monitor == "f1" else [val_loss]) if val else [float(means[0])]
        improved = history.best_monitor is None or key < list(np.atleast_1d(history.best_monitor))
        if improved:
            history.best_epoch, history.best_monitor, wait = epoch + 1, key, 0
            if ckpt is not None:
                _save_weights(trainer, ckpt / BEST_WEIGHTS, False,
                              {"epoch": epoch + 1, monitor_name: abs(key[0]), **weights_meta})
            else:
                best_params = {name: trainer.get(name) for name in trainer.names}
        else:
            wait += 1
            if wait >= max(patience, 1):  # Keras EarlyStopping: `patience` epochs without improvement
                history.stopped_early = True
        if ckpt is not None:
            name = f"checkpoint-{epoch + 1:05d}.safetensors"
            _save_weights(trainer, ckpt / name, True, {"epoch": epoch + 1, **weights_meta})
            _write_json(ckpt / STATE_FILE, dict(settings=settings, epoch=epoch + 1, step_count=trainer.step_count,
                                                wait=wait, checkpoint=name, history=history.to_dict(),
                                                rng=dict(scheme="SeedSequence([seed, epoch, ...])", seed=int(seed)),
                                                monitor=monitor_name))
            for old in ckpt.glob("checkpoint-*.safetensors"):
                if old.name != name:
                    old.unlink(missing_ok=True)
            try:
                save_training_curves(history, ckpt / CURVES_FILE)
            except Exception:  # a plot must never stop training
                pass
        if on_epoch is not None:
            on_epoch({k: (v[-1] if isinstance(v, list) and v else v) for k, v in history.to_dict().items()})

    # keep the best weights (Keras EarlyStopping(restore_best_weights=True))
    if ckpt is not None and (ckpt / BEST_WEIGHTS).is_file():
        trainer.load(str(ckpt / BEST_WEIGHTS))
    elif best_params is not None:
        for name, value in best_params.items():
            trainer.set(name, value)
    return (history, trainer) if return_trainer else history


# ---------------------------------------------------------------------------------------------- plots

def save_training_curves(history: History, path: str | os.PathLike, size=(800, 500)) -> None:
    """A PNG with the training and validation loss (left axis, log scale) and the validation F1
    (right axis, 0..1) per epoch, drawn with Pillow (no plotting library needed). Atomic write."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 60, 30, 72  # the legend goes below the plot area, where it hides no curve
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pw, ph = w - left - right, h - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    epochs = history.epoch
    d.text((left, 8), "DeepSpot training: loss (log, left), validation F1 (right)", fill="black")
    if epochs:
        losses = [v for v in history.loss + history.val_loss if v is not None and math.isfinite(v) and v > 0]
        lo, hi = (min(losses), max(losses)) if losses else (1e-3, 1.0)
        if hi <= lo:
            hi = lo * 10
        llo, lhi = math.log10(lo), math.log10(hi)
        e0, e1 = epochs[0], max(epochs[-1], epochs[0] + 1)

        def px(e):
            return left + (e - e0) / (e1 - e0) * pw

        def py_loss(v):
            return top + (lhi - math.log10(v)) / (lhi - llo) * ph

        def py_f1(v):
            return top + (1 - v) * ph

        for values, colour, scale in ((history.loss, (31, 119, 180), py_loss), (history.val_loss, (255, 127, 14), py_loss),
                                      (history.val_f1, (44, 160, 44), py_f1)):
            pts = [(px(e), scale(v)) for e, v in zip(epochs, values)
                   if v is not None and math.isfinite(v) and (scale is py_f1 or v > 0)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            for x, y in pts:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        for k in range(5):
            v = 10 ** (llo + (lhi - llo) * k / 4)
            y = py_loss(v)
            d.line([left - 4, y, left, y], fill="black")
            d.text((4, y - 6), f"{v:.3g}", fill="black")
            f = k / 4
            d.line([left + pw, py_f1(f), left + pw + 4, py_f1(f)], fill="black")
            d.text((left + pw + 8, py_f1(f) - 6), f"{f:.2f}", fill="black")
        for e in sorted({e0, epochs[-1], (e0 + epochs[-1]) // 2}):
            d.text((px(e) - 6, top + ph + 6), str(e), fill="black")
    d.text((left + pw // 2 - 20, top + ph + 24), "epoch", fill="black")
    for i, (label, colour) in enumerate((("train loss", (31, 119, 180)), ("val loss", (255, 127, 14)),
                                         ("val F1", (44, 160, 44)))):
        x = left + 10 + i * 120
        d.line([x, h - 14, x + 20, h - 14], fill=colour, width=3)
        d.text((x + 26, h - 20), label, fill="black")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
