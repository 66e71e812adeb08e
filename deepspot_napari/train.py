"""Training DeepSpot on annotated images: `fit` (and `Model.fit`, which calls it).

Every numeric step of training runs in the C core (its Trainer, on the model's device and
precision: forward in training mode, loss, backward, Adam; csrc/train.c); this module prepares
the data (patches, targets), splits off validation, runs the epochs, validates (loss and
detection F1), checkpoints, resumes and stops early. REFERENCE_MODEL.md sections 2-3 give the
recipe it follows.

Data: each image is divided by its own maximum; its target e(X) is the image on the 0..255 scale
with the 3x3 stamp [[200,230,200],[230,255,230],[200,230,200]] written at every annotated spot,
then divided by its own maximum (as the authors' dataset.py and simulate.make_target). Images
larger than the patch size are cut into patches (the last row/column of patches is aligned to the
image's end, so patches may overlap there); smaller sides are padded with zeros.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .safetensors_io import save_safetensors

__all__ = ["fit", "History", "initial_parameters", "make_training_pair", "save_training_curves",
           "STATE_FILE", "BEST_WEIGHTS"]

STAMP = np.array([[200, 230, 200], [230, 255, 230], [200, 230, 200]], dtype=np.float32)
STATE_FILE = "state.json"
BEST_WEIGHTS = "best.safetensors"
CURVES_FILE = "curves.png"
STATE_FORMAT = "deepspot-napari-training/2"  # 2: validation held out by image
SIZE_MULTIPLE = 8


@dataclass
class History:
    """Per-epoch records (lists aligned by epoch) and how the run ended."""

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)          # mean training loss over the epoch's steps
    bce: list[float] = field(default_factory=list)
    max_term: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)      # inference mode (moving statistics)
    val_f1: list[float] = field(default_factory=list)        # mean per-patch F1 (nearest, 3 px)
    val_precision: list[float] = field(default_factory=list)
    val_recall: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_monitor: float | None = None
    stopped_early: bool = False
    steps: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})


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


def make_training_pair(image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) float32 for one image: the image divided by its maximum, and e(X) divided by
    its maximum (REFERENCE_MODEL section 3; where stamps overlap the larger value wins)."""
    image = np.asarray(image, np.float32)
    peak = float(image.max())
    x = image / np.float32(peak)
    target = x * np.float32(255.0)
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
    return x, (target / target.max()).astype(np.float32)


def _patch_starts(length: int, patch: int) -> list[int]:
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, patch))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def _patches(image: np.ndarray, points: np.ndarray, patch: int):
    """Yields (patch image, points in patch coordinates) covering the image; zero-padded when small."""
    h, w = image.shape
    if h < patch or w < patch:
        padded = np.zeros((max(h, patch), max(w, patch)), np.float32)
        padded[:h, :w] = image
        image, h, w = padded, padded.shape[0], padded.shape[1]
    r = np.rint(points) if len(points) else np.zeros((0, 2))
    for y0 in _patch_starts(h, patch):
        for x0 in _patch_starts(w, patch):
            inside = (r[:, 0] >= y0) & (r[:, 0] < y0 + patch) & (r[:, 1] >= x0) & (r[:, 1] < x0 + patch)
            yield image[y0:y0 + patch, x0:x0 + patch], points[inside] - np.array([y0, x0], np.float64)


@dataclass
class _Data:
    x: np.ndarray          # [n, p, p] float32 inputs
    t: np.ndarray          # [n, p, p] float32 targets
    points: list           # (k, 2) per patch
    sources: np.ndarray    # [n] the index of the image each patch was cut from

    def subset(self, index: np.ndarray) -> "_Data":
        return _Data(self.x[index], self.t[index], [self.points[i] for i in index], self.sources[index])

    def join(self, other: "_Data") -> "_Data":
        return _Data(np.concatenate([self.x, other.x]), np.concatenate([self.t, other.t]), self.points + other.points,
                     np.concatenate([self.sources, other.sources]))

    def __len__(self) -> int:
        return len(self.x)


def _prepare(images: Sequence, points: Sequence, patch: int) -> _Data:
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
        points = [points]
    images, points = list(images), list(points)
    if len(images) != len(points):
        raise ValueError(f"got {len(images)} images but {len(points)} point lists; give one (n, 2) array of "
                         "(y, x) points per image")
    if not images:
        raise ValueError("no training images given")
    xs, ts, ps, sources = [], [], [], []
    for i, (image, pts) in enumerate(zip(images, points)):
        image = _check_image(image, i)
        pts = _check_points(pts, image.shape, i)
        for tile, tile_points in _patches(image, pts, patch):
            if tile.max() <= 0:
                continue  # an empty (all-zero) patch has nothing to scale by
            x, t = make_training_pair(tile, tile_points)
            xs.append(x)
            ts.append(t)
            ps.append(tile_points)
            sources.append(i)
    if not xs:
        raise ValueError("no usable training patches (every patch is all zero)")
    return _Data(np.stack(xs), np.stack(ts), ps, np.array(sources))


def _simulated(n: int, patch: int, seed: int, epoch: int) -> _Data:
    from .simulate import simulate_image
    xs, ts, ps = [], [], []
    children = np.random.SeedSequence([seed, epoch, 0x51]).spawn(n)
    for child in children:
        image, spots = simulate_image(np.random.default_rng(child), recipe="hybrid", size=patch)
        x, t = make_training_pair(image.astype(np.float32), spots)
        xs.append(x)
        ts.append(t)
        ps.append(spots)
    return _Data(np.stack(xs), np.stack(ts), ps, -1 - np.arange(n))  # each its own image, apart from the user's


def _validation_mask(data: _Data, fraction: float, seed: int) -> np.ndarray:
    """Which patches validate: whole images (seeded order) until about `fraction` of the patches, so that
    no validation patch has a neighbour from its own image in training; by patch when there is only one
    image. At least one patch stays for training."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11]))
    wanted = int(round(fraction * len(data))) if len(data) > 1 else 0
    images = np.unique(data.sources)
    if wanted == 0:
        return np.zeros(len(data), bool)
    if len(images) == 1:
        mask = np.zeros(len(data), bool)
        mask[rng.permutation(len(data))[:wanted]] = True
        return mask
    mask = np.zeros(len(data), bool)
    for image in rng.permutation(images)[:-1]:  # the last image always trains
        if mask.sum() >= wanted:
            break
        candidate = mask | (data.sources == image)
        # take the image if that brings the count closer to the wanted one
        if abs(candidate.sum() - wanted) <= abs(mask.sum() - wanted) or not mask.any():
            mask = candidate
    return mask


def _fingerprint(data: _Data) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.x).tobytes())
    h.update(np.ascontiguousarray(data.t).tobytes())
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

def _validate(trainer, data: _Data, batch_size: int, detection) -> tuple[float, float, float, float]:
    from .detect import detect_spots
    from .metrics import match_nearest
    if len(data) == 0:
        return math.nan, math.nan, math.nan, math.nan
    total, f1s, precisions, recalls = 0.0, [], [], []
    for start in range(0, len(data), batch_size):
        x, t = data.x[start:start + batch_size], data.t[start:start + batch_size]
        pred, (loss, _, _) = trainer.evaluate(x, t)
        total += loss * len(x)
        for k, p in enumerate(pred):
            spots = detect_spots(p, params=detection) if detection is not None else detect_spots(p)
            counts = match_nearest(data.points[start + k], spots.coords)
            f1s.append(counts.f1)
            precisions.append(counts.precision)
            recalls.append(counts.recall)
    return total / len(data), float(np.mean(f1s)), float(np.mean(precisions)), float(np.mean(recalls))


# ---------------------------------------------------------------------------------------------- fit

def _resolve_model(model_or_path):
    from .model import Model
    return model_or_path if isinstance(model_or_path, Model) else Model.load(model_or_path)


def fit(model_or_path=None, images=(), points=(), *, epochs: int, batch_size: int = 8,
        learning_rate: float = 1e-4, validation_split: float = 0.2, seed: int = 0, max_term: str = "batch",
        dropout: float = 0.2, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
        patience: int = 200, progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None, simulate: int = 0, patch_size: int = 256,
        from_scratch: bool = False, bn_bessel: bool = False, detection=None, on_epoch: Callable[[dict], None] | None = None,
        return_trainer: bool = False):
    """Trains the network on `images` (2D arrays, any size) annotated with `points` ((n, 2) arrays of
    (y, x) pixel positions, one per image) and returns a History (and the trainer if
    return_trainer; `trainer.to_network()` gives the trained inference network).

    model_or_path: a Model (training runs on its device and precision), a safetensors weights path,
    or None for the bundled published weights (both loaded with Model.load's defaults: device "auto",
    float32); from_scratch=True replaces them by Keras' default initialisation (seeded).
    epochs, batch_size, learning_rate (Adam, beta 0.9/0.999, epsilon 1e-7), dropout (spatial dropout
    rate), max_term ("batch": the authors' code, "per_image": the paper, "none"): the recipe.
    bn_bessel: the BN moving variance takes the unbiased batch variance (TF 2.x's fused batch norm,
    which trained the published weights) instead of the biased one (Keras 3, the default).
    validation_split: fraction of the patches held out (seeded), as whole images when there are several
    (patches of one image are correlated, so a held-out image is the honest test), else as patches;
    validated after each epoch in
    inference mode (loss and mean per-patch F1 of detect_spots on the enhanced patch against the
    annotations, nearest match within 3 px; `detection` = DetectionParams to use).
    patience: epochs without a better validation loss (training loss without validation) after
    which training stops (as Keras' EarlyStopping; 0 acts as 1); the best weights are restored at
    the end (restore_best_weights).
    checkpoint_dir: where each epoch's checkpoint, the best weights (best.safetensors, loadable by
    Model.load), the state file and curves.png go; with resume=True a run found there continues.
    simulate: this many extra simulated images (simulate.simulate_image, "hybrid" recipe) join the
    training set each epoch. patch_size: side of the training patches (a multiple of 8).
    progress(done, total) after each step; cancel() -> True stops with model.Cancelled (the
    checkpoint of the last complete epoch stays valid)."""
    from .model import Cancelled

    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if max_term not in ("batch", "per_image", "none"):
        raise ValueError(f"max_term must be 'batch', 'per_image' or 'none', got {max_term!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if patch_size < SIZE_MULTIPLE or patch_size % SIZE_MULTIPLE:
        raise ValueError(f"patch_size must be a positive multiple of {SIZE_MULTIPLE}, got {patch_size}")
    if simulate < 0 or patience < 0:
        raise ValueError("simulate and patience must be >= 0")

    data = _prepare(images, points, patch_size)
    val_mask = _validation_mask(data, validation_split, seed)
    train, val = data.subset(np.flatnonzero(~val_mask)), data.subset(np.flatnonzero(val_mask))

    trainer = _resolve_model(model_or_path).make_trainer(learning_rate=learning_rate, dropout=dropout,
                                                         max_term=max_term, seed=seed, bn_bessel=bool(bn_bessel))
    if from_scratch:
        for name, value in initial_parameters(trainer, seed).items():
            trainer.set(name, value)

    settings = dict(format=STATE_FORMAT, batch_size=int(batch_size), learning_rate=float(learning_rate),
                    validation_split=float(validation_split), seed=int(seed), max_term=max_term,
                    dropout=float(dropout), simulate=int(simulate), patch_size=int(patch_size),
                    from_scratch=bool(from_scratch), bn_bessel=bool(bn_bessel), data=_fingerprint(data))
    history = History()
    start_epoch, wait = 0, 0
    best_params: dict[str, np.ndarray] | None = None
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        state_path = ckpt / STATE_FILE
        if resume and state_path.is_file():
            state = json.loads(state_path.read_text())
            mismatch = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
            if mismatch:
                raise ValueError(f"cannot resume from {ckpt}: the run there used other settings or data "
                                 f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in mismatch.items())}); "
                                 "use another checkpoint_dir or resume=False")
            trainer.load(str(ckpt / state["checkpoint"]))
            trainer.step_count = int(state["step_count"])
            history = History.from_dict(state["history"])
            start_epoch, wait = int(state["epoch"]), int(state["wait"])

    steps_per_epoch = -(-(len(train) + simulate) // batch_size)
    total_steps = steps_per_epoch * epochs
    done = start_epoch * steps_per_epoch
    monitor_name = "val_loss" if len(val) else "loss"

    for epoch in range(start_epoch, epochs):
        if history.stopped_early:
            break
        began = time.perf_counter()
        epoch_data = train
        if simulate:
            extra = _simulated(simulate, patch_size, seed, epoch)
            epoch_data = train.join(extra)
        perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EED])).permutation(len(epoch_data))
        sums = np.zeros(3)
        for b in range(steps_per_epoch):
            idx = np.sort(perm[b * batch_size:(b + 1) * batch_size])
            sums += trainer.step(np.ascontiguousarray(epoch_data.x[idx]), np.ascontiguousarray(epoch_data.t[idx]))
            done += 1
            if progress is not None:
                progress(done, total_steps)
            if cancel is not None and cancel():
                raise Cancelled(f"training cancelled in epoch {epoch + 1}")
        means = sums / steps_per_epoch
        val_loss, val_f1, val_p, val_r = _validate(trainer, val, batch_size, detection)
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
        monitor = val_loss if len(val) else float(means[0])
        improved = history.best_monitor is None or monitor < history.best_monitor
        if improved:
            history.best_epoch, history.best_monitor, wait = epoch + 1, monitor, 0
            if ckpt is not None:
                _save_weights(trainer, ckpt / BEST_WEIGHTS, False, {"epoch": epoch + 1, monitor_name: monitor})
            else:
                best_params = {name: trainer.get(name) for name in trainer.names}
        else:
            wait += 1
            if wait >= max(patience, 1):  # Keras EarlyStopping: `patience` epochs without improvement
                history.stopped_early = True
        if ckpt is not None:
            name = f"checkpoint-{epoch + 1:05d}.safetensors"
            _save_weights(trainer, ckpt / name, True, {"epoch": epoch + 1})
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
    left, right, top, bottom = 70, 60, 30, 50
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
    d.text((left + pw // 2 - 20, h - 22), "epoch", fill="black")
    for i, (label, colour) in enumerate((("train loss", (31, 119, 180)), ("val loss", (255, 127, 14)),
                                         ("val F1", (44, 160, 44)))):
        x = left + 10 + i * 120
        d.line([x, top + 12, x + 20, top + 12], fill=colour, width=3)
        d.text((x + 26, top + 6), label, fill="black")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
