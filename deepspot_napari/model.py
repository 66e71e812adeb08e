"""The plain Python API that the CLI and the napari widgets both call: Model.load / enhance /
detect. Tiling, blending and stacks are bookkeeping done here; the network runs in the C core
(deepspot_napari._core, oneDNN on CPU, or deepspot_napari._core_cuda, cuDNN on an NVIDIA GPU; see
devices.py) with the GIL released."""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable

import numpy as np

# the bundled models' names and files are part of this API
from .bundled import (BUNDLED_MODELS, BUNDLED_WEIGHTS, DEFAULT_MODEL, bundled_models,  # noqa: F401
                      bundled_weights_path, weights_path)
from .detect import DEFAULT_DETECTION, DetectionParams, Spots, detect_spots
from .devices import core_module, resolve_device, resolve_precision
from .errors import Cancelled
from .images import as_image_stack, scale_plane

SIZE_MULTIPLE = 8  # three stride-2 stages down and up
# Windows of 1056 px, one at a time: a 2048x2048 plane in two windows per side (1024 + the encoder's
# 32 px halo), 1.02x the time of one whole pass in float32 (768 px: three per side, 1.14x) with 0.9
# GiB peak memory (768 px: 0.7; a whole pass: 2.3); docs/benchmarks.md.
DEFAULT_TILE_SIZE = 1056
DEFAULT_BATCH_SIZE = 1


def detection_from_metadata(metadata: dict[str, str]) -> DetectionParams:
    """DetectionParams of a weights file's "detection" metadata (fields not given keep
    DEFAULT_DETECTION's), or DEFAULT_DETECTION without it; a malformed entry raises ValueError."""
    import dataclasses
    import json
    text = metadata.get("detection")
    if not text:
        return DEFAULT_DETECTION
    try:
        fields = json.loads(text)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return dataclasses.replace(DEFAULT_DETECTION, **fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the weights' detection metadata is not valid DetectionParams JSON: {text!r} ({exc})") from None


def detection_defaults(weights: str | Path | None) -> DetectionParams:
    """Model.detection of a weights argument (weights_path), read from its metadata without loading it."""
    from .safetensors_io import read_metadata
    return detection_from_metadata(read_metadata(weights_path(weights)))


# Receptive-field radius of each stage at its own input resolution, rounded up: a window this
# much larger than the part kept from it computes that part exactly as a whole-image pass would.
ENCODER_HALO_PX = 32    # CASO: the atrous path reaches about 21 px
TRUNK_HALO_CELLS = 16   # 13 blocks with one 3x3 conv each, at 1/8 resolution
DECODER_HALO_CELLS = 4  # three up-blocks: about 2 cells at 1/8 resolution
ENCODER, TRUNK, DECODER = 0, 1, 2

_CACHE: dict = {}  # Model.cached's models
_CACHE_LOCK = threading.Lock()


def _windows(length: int, window: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Covers [0, length) with input windows [start, start + size) and the parts
    [keep_start, keep_stop) taken from each: at least `halo` away from a window edge unless that
    edge is the image's own. As few windows as `window` allows, all of one size (one plan), shrunk
    so that they overlap no more than the halos need. Starts stay multiples of gcd(window, halo, length)."""
    if length <= window:
        return [(0, length, 0, length)]
    # n windows of size w keep 2 (w - halo) + (n - 2) (w - 2 halo) = n w - 2 halo (n - 1) pixels
    count = 2 + max(0, -(-(length - 2 * (window - halo)) // (window - 2 * halo)))
    align = math.gcd(window, halo, length)
    needed = -(-(length + 2 * halo * (count - 1)) // count)
    window = min(window, -(-needed // align) * align)
    spans, keep_start = [], 0
    while keep_start < length:
        start = min(max(keep_start - halo, 0), length - window)
        stop = start + window
        keep_stop = length if stop == length else stop - halo
        spans.append((start, stop, keep_start, keep_stop))
        keep_start = keep_stop
    return spans


def _run_windows(run_batch, source: np.ndarray, target: np.ndarray, window: int, halo: int, scale: float,
                 batch_size: int, step: Callable[[], None]) -> None:
    """Runs `run_batch` over windows of source [H, W, C] and writes the kept parts into target,
    whose resolution is `scale` times the source's."""
    rows = _windows(source.shape[0], window, halo)
    cols = _windows(source.shape[1], window, halo)
    jobs = [(r, c) for r in rows for c in cols]
    # Evenly sized batches: at most two batch shapes, so at most two plans per stage.
    n_batches = -(-len(jobs) // batch_size)
    bounds = np.linspace(0, len(jobs), n_batches + 1).round().astype(int)
    for first, last in zip(bounds[:-1], bounds[1:]):
        chunk = jobs[first:last]
        batch = np.stack([source[r[0]:r[1], c[0]:c[1]] for r, c in chunk])
        result = run_batch(batch)
        for (r, c), out in zip(chunk, result):
            keep_r = slice(int((r[2] - r[0]) * scale), int((r[3] - r[0]) * scale))
            keep_c = slice(int((c[2] - c[0]) * scale), int((c[3] - c[0]) * scale))
            target[int(r[2] * scale):int(r[3] * scale), int(c[2] * scale):int(c[3] * scale)] = out[keep_r, keep_c]
        step()


def _padded_geometry(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(padded shape, trunk cells) of a plane: its sides rounded up to a multiple of 8, and that over 8."""
    padded = tuple(-(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE for n in shape)
    return padded, (padded[0] // SIZE_MULTIPLE, padded[1] // SIZE_MULTIPLE)


def _pad_plane(scaled: np.ndarray, padded_shape: tuple[int, int]) -> np.ndarray:
    """The scaled plane mirror-padded at its end to padded_shape (the network's input)."""
    h, w = scaled.shape
    return np.pad(scaled, ((0, padded_shape[0] - h), (0, padded_shape[1] - w)), mode="symmetric")


def _count_windows(shape: tuple[int, int], window: int, halo: int, batch_size: int) -> int:
    n = len(_windows(shape[0], window, halo)) * len(_windows(shape[1], window, halo))
    return -(-n // batch_size)


class Model:
    """A DeepSpot network loaded from a safetensors file, on one device ("cpu" or "cuda").

    `enhance` is thread-safe (calls are serialised); the GIL is released while the network runs."""

    def __init__(self, network, path: Path, device: str, metadata: dict[str, str] | None = None):
        from .safetensors_io import read_metadata
        self._network = network
        self._core = core_module(device)
        self.path = path
        # how the weights were made (safetensors metadata), read once with them
        self.metadata = read_metadata(path) if metadata is None else metadata
        self.device = device
        self._lock = threading.Lock()
        self.shared = False  # Model.cached's: used by others, so never changed in place

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "auto", precision: str = "float32") -> "Model":
        """Loads weights: a safetensors file, a bundled model's name (BUNDLED_MODELS: "hybrid", the
        published weights), or None for the default bundled model. device: "auto" (the GPU when one
        works here, else the CPU), "cpu" or "cuda"; precision: "float32", "tf32" (TF32 tensor-core
        convolutions, GPU only), "bf16" (bf16 convolutions with float32 accumulation, CPUs with bf16
        instructions only) or "auto" (bf16 where it runs, else float32). See devices.resolve_device for
        the errors."""
        device = resolve_device(device, precision)
        precision = resolve_precision(precision, device)
        path = weights_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return cls(core_module(device).Network(str(path), math=precision), path, device)

    @classmethod
    def cached(cls, weights: str | Path | None = None, *, device: str = "auto", precision: str = "float32") -> "Model":
        """Model.load's model, loaded once per process and then shared by every caller (the napari
        widgets, batches of files, each Dask worker): keyed by the weights file (with its modification
        time and size, so a rewritten file is loaded again), the device and the precision. enhance and
        detect are thread-safe; fit refuses a shared model (fit a Model.load one)."""
        path = weights_path(weights).resolve()
        stat = path.stat() if path.is_file() else None
        key = (str(path), device, precision, stat and (stat.st_mtime_ns, stat.st_size))
        with _CACHE_LOCK:
            model = _CACHE.get(key)
            if model is None:
                model = _CACHE[key] = cls.load(path, device=device, precision=precision)
                model.shared = True
            return model

    @property
    def target_background(self) -> float | None:
        """The training target the weights were made for (train.make_training_pair): None for the
        paper's (background kept, divided by its own maximum), else the level the background was
        scaled to. Fine-tuning keeps it."""
        value = self.metadata.get("target_background")
        return None if value in (None, "", "None") else float(value)

    @property
    def detection(self) -> DetectionParams:
        """The detection defaults chosen for these weights on validation data (the weights file's
        "detection" metadata, JSON of DetectionParams fields), else DEFAULT_DETECTION (chosen for
        the published weights: docs/detection_defaults.md)."""
        return detection_from_metadata(self.metadata)

    @property
    def precision(self) -> str:
        """The convolutions' arithmetic: "float32", "tf32" or "bf16"."""
        return self._network.math

    @property
    def num_parameters(self) -> int:
        return self._network.num_parameters

    def make_trainer(self, **options):
        """A C-core Trainer of this model's network on its device and precision (options: the
        Trainer's keywords, e.g. learning_rate, dropout, max_term, seed)."""
        return self._core.Trainer(self._network, **options)

    def forward(self, batch: np.ndarray, first_stage: int = ENCODER, last_stage: int = DECODER) -> np.ndarray:
        """The raw network on an NHWC float32 batch: from the encoder, a [n, h, w, 1] image already
        scaled to [0, 1] with sides multiples of 8; see the C core's Network.forward for the stages."""
        with self._lock:
            return self._network.forward(np.ascontiguousarray(batch, dtype=np.float32), first_stage, last_stage)

    def fit(self, images, points, **kwargs):
        """Trains this model on annotated images and keeps the trained (best) weights in place;
        returns the History. images: 2D arrays; points: one (n, 2) array of (y, x) per image. See
        deepspot_napari.train.fit for every option and its default (epochs, regions, batch_size,
        learning_rate, validation_split, seed, patience, checkpoint_dir, resume, progress, cancel, ...).
        The trained network replaces this model's under its lock when training ends (an enhance()
        running meanwhile finishes with the old one) and stays on this model's device and
        precision; with a checkpoint_dir, `path` becomes its best.safetensors."""
        from .train import fit as train_fit
        if self.shared:
            raise ValueError("this model is shared (Model.cached): fine-tune a model of your own, "
                             "Model.load(model.path, device=model.device, precision=model.precision)")
        kwargs.pop("return_trainer", None)
        history, trainer = train_fit(self, images, points, return_trainer=True, **kwargs)
        network = trainer.to_network()
        with self._lock:
            self._network = network
        checkpoint_dir = kwargs.get("checkpoint_dir")
        if checkpoint_dir is not None:
            from .train import BEST_WEIGHTS
            best = Path(checkpoint_dir) / BEST_WEIGHTS
            if best.is_file():
                from .safetensors_io import read_metadata
                self.path, self.metadata = best, read_metadata(best)
        return history

    def enhance(self, image, *, tile_size: int | None = DEFAULT_TILE_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
                max_value: float | None = None,
                progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """Enhances a 2D image (Y, X) or a stack (..., Y, X) of any integer or float dtype and any size.

        Each plane is divided by its own maximum (the reference scaling) and mirror-padded to a
        multiple of 8. Large planes are processed in windows of tile_size pixels, stage by stage
        (encoder, trunk, decoder), each window carrying a halo as wide as the stage's receptive
        field: the result equals a whole-plane pass (tile_size=None) to float32 rounding while memory
        stays bounded by the window size. max_value replaces each plane's maximum in the scaling (for a block of a
        larger image, pass the whole image's maximum). Returns float32 in [0, 1] of the input's shape. progress(done, total) is
        called after each batch of windows; if cancel() returns True the run stops with Cancelled."""
        image = as_image_stack(image)
        if tile_size is not None and (tile_size < 128 or tile_size % (2 * SIZE_MULTIPLE)):
            raise ValueError(f"tile_size must be a multiple of {2 * SIZE_MULTIPLE} and >= 128, got {tile_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        planes = image.reshape((-1,) + image.shape[-2:])
        padded_shape, cells = _padded_geometry(planes.shape[-2:])
        if tile_size is None:
            windows = (max(padded_shape), max(cells), max(cells))
        else:
            windows = (tile_size, tile_size // 2, tile_size // SIZE_MULTIPLE)
        total = len(planes) * (_count_windows(padded_shape, windows[0], ENCODER_HALO_PX, batch_size)
                               + _count_windows(cells, windows[1], TRUNK_HALO_CELLS, batch_size)
                               + _count_windows(cells, windows[2], DECODER_HALO_CELLS, batch_size))
        done = 0

        def step():
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)
            if cancel is not None and cancel():
                raise Cancelled("enhancement cancelled")

        out = np.empty(planes.shape, np.float32)
        for index, plane in enumerate(planes):
            where = "image" if len(planes) == 1 else f"plane {index} of the stack"
            scaled = scale_plane(plane, where, max_value)
            h, w = scaled.shape
            padded = _pad_plane(scaled, padded_shape)
            features = np.empty(cells + (384,), np.float32)
            _run_windows(lambda b: self.forward(b, ENCODER, ENCODER), padded[..., None], features,
                         windows[0], ENCODER_HALO_PX, 1 / SIZE_MULTIPLE, batch_size, step)
            trunk = np.empty(cells + (128,), np.float32)
            _run_windows(lambda b: self.forward(b, TRUNK, TRUNK), features, trunk,
                         windows[1], TRUNK_HALO_CELLS, 1, batch_size, step)
            del features
            enhanced = np.empty(padded_shape + (1,), np.float32)
            _run_windows(lambda b: self.forward(b, DECODER, DECODER), trunk, enhanced,
                         windows[2], DECODER_HALO_CELLS, SIZE_MULTIPLE, batch_size, step)
            out[index] = enhanced[:h, :w, 0]
        return out.reshape(image.shape)

    def enhance_region(self, plane, rows: tuple[int, int], cols: tuple[int, int], *,
                       cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """The enhanced pixels [rows[0]:rows[1], cols[0]:cols[1]] of a 2D plane, as `enhance(plane)` computes
        them (to float32 rounding), for a fraction of the work: each stage runs only on the part of the
        plane its output needs (the region, grown by the decoder's, trunk's and encoder's receptive fields),
        on grids aligned with the whole plane's. For showing the part of a large plane in view first.
        cancel() is checked between stages (Cancelled)."""
        plane = np.asarray(plane)
        if plane.ndim != 2:
            raise ValueError(f"enhance_region takes one 2D plane, got shape {plane.shape}")
        h, w = plane.shape
        (r0, r1), (c0, c1) = (int(v) for v in rows), (int(v) for v in cols)
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ValueError(f"region rows {rows}, cols {cols} must be non-empty and inside the plane {plane.shape}")
        padded_shape, cells = _padded_geometry((h, w))

        def grow(span, by, limit):
            return max(span[0] - by, 0), min(span[1] + by, limit)

        view = [(r0 // SIZE_MULTIPLE, -(-r1 // SIZE_MULTIPLE)), (c0 // SIZE_MULTIPLE, -(-c1 // SIZE_MULTIPLE))]
        decoder_in = [grow(v, DECODER_HALO_CELLS, n) for v, n in zip(view, cells)]
        trunk_in = [grow(v, TRUNK_HALO_CELLS, n) for v, n in zip(decoder_in, cells)]
        encoder_in = [grow((a * SIZE_MULTIPLE, b * SIZE_MULTIPLE), ENCODER_HALO_PX, n)
                      for (a, b), n in zip(trunk_in, padded_shape)]
        # the crop of the padded plane: the plane's own pixels, mirrored past its end as enhance pads it
        (y0, y1), (x0, x1) = encoder_in
        crop = _pad_plane(scale_plane(plane), padded_shape)[y0:y1, x0:x1]

        def stage(batch, which, take, have):
            if cancel is not None and cancel():
                raise Cancelled("enhancement cancelled")
            out = self.forward(batch[None], which, which)[0]
            return out[take[0][0] - have[0][0]:take[0][1] - have[0][0], take[1][0] - have[1][0]:take[1][1] - have[1][0]]

        cells_of_crop = [(y0 // SIZE_MULTIPLE, y1 // SIZE_MULTIPLE), (x0 // SIZE_MULTIPLE, x1 // SIZE_MULTIPLE)]
        features = stage(crop[..., None], ENCODER, trunk_in, cells_of_crop)
        trunk = stage(features, TRUNK, decoder_in, trunk_in)
        pixels_of_decoder = [(a * SIZE_MULTIPLE, b * SIZE_MULTIPLE) for a, b in decoder_in]
        enhanced = stage(trunk, DECODER, [(r0, r1), (c0, c1)], pixels_of_decoder)
        return np.ascontiguousarray(enhanced[..., 0])

    def detect(self, image, *, enhanced: np.ndarray | None = None, params: DetectionParams | None = None,
               stack: str = "zstack", progress: Callable[[int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None, **overrides) -> Spots:
        """Finds the spots of a 2D image (Y, X), a z-stack (Z, Y, X) or any stack (..., Y, X):
        enhances it (unless its enhanced version is given) and runs the detector with one fixed
        parameter set (`params`; None: the model's own defaults, Model.detection; keyword overrides
        such as threshold=0.6 replace single fields). Intensities are sampled from `image`.
        stack: "zstack" (default): the last three axes are a z-stack, so (T, Z, Y, X) or (C, Z, Y, X)
        is detected one z-stack per time point or channel; "planes": every (Y, X) plane on its own,
        e.g. a time series (T, Y, X). Coordinates have one column per axis of `image` (see
        detect.detect_spots)."""
        image = as_image_stack(image)
        if enhanced is None:
            enhanced = self.enhance(image, progress=progress, cancel=cancel)
        elif np.shape(enhanced) != image.shape:
            raise ValueError(f"enhanced has shape {np.shape(enhanced)}; it must match the image's {image.shape}")
        return detect_spots(enhanced, raw=image, params=self.detection if params is None else params, stack=stack,
                            cancel=cancel, **overrides)
