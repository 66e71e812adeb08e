"""Whole data sets: images larger than memory, processed block by block with exact results.

An image (2D, or a stack whose last two axes are Y, X) is cut into square blocks of
`block_size` pixels (origins multiples of 8, so the network's stride grids line up). Each block
is enhanced from a window that extends HALO_PX (256 px, more than the network's receptive-field
radius RECEPTIVE_FIELD_PX = 192 px) beyond it on every side that is not the image's own border,
with every plane scaled by the WHOLE plane's maximum (found in a first pass over the blocks).
The bottom/right padding to a multiple of 8 happens only in windows that reach the image's own
border, exactly as Model.enhance pads the whole image, so the blocked result equals the
in-memory Model.enhance result (bit for bit on the same machine and thread count). Memory is
bounded by the block size: about 40 bytes per pixel of a (block + 2 halo)^2 window, plus the
block's planes.

Detection runs per block on the block's core plus a margin (enhanced the same way) and keeps the
spots whose rounded position lies in the core: a spot on a core border is found by exactly one
block, and the peak detector's results equal a whole-image pass (the margin covers its footprint,
its refinement window and its z-merge radius; min_distance suppression is exact as long as no
chain of suppressions reaches across the margin). The wavelet detector's threshold is a statistic
of the image it sees, so per block it is an approximation of the whole-image detector.

The work is expressed as two picklable task functions, `extrema_task` and `block_task`, which
take either live objects (a local run) or paths (a Dask worker, see distributed.py), so a
cluster run computes exactly what a local run computes. `process_file` is what the CLI calls for
one input (in memory when it is small, in blocks when it is a Zarr or a large image).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .detect import DEFAULT_DETECTION, DetectionParams, Spots, detect_spots
from .model import (DECODER_HALO_CELLS, DEFAULT_BATCH_SIZE, DEFAULT_TILE_SIZE, ENCODER_HALO_PX, SIZE_MULTIPLE,
                    TRUNK_HALO_CELLS, Cancelled, Model, detection_defaults)

RECEPTIVE_FIELD_PX = ENCODER_HALO_PX + (TRUNK_HALO_CELLS + DECODER_HALO_CELLS) * SIZE_MULTIPLE  # 192
HALO_PX = 256
DEFAULT_BLOCK_SIZE = 2048
MIN_BLOCK_SIZE = 32
# Above this many pixels (all planes together) an image is processed in blocks and its enhanced
# version written as Zarr: the in-memory path needs about 40 bytes per pixel of a plane.
LARGE_IMAGE_PIXELS = 2**25
# Chunks of the enhanced Zarr output: the block size up to this side, else a divisor of it.
MAX_CHUNK = 2048

Core = tuple[int, int, int, int]  # (y0, y1, x0, x1) of a block, in pixels of the whole image


# ---------------------------------------------------------------- geometry


def check_block_size(block_size: int) -> int:
    block_size = int(block_size)
    if block_size < MIN_BLOCK_SIZE or block_size % SIZE_MULTIPLE:
        raise ValueError(f"block size must be a multiple of {SIZE_MULTIPLE} and >= {MIN_BLOCK_SIZE}, got {block_size}")
    return block_size


def check_halo(halo: int) -> int:
    halo = int(halo)
    if halo < RECEPTIVE_FIELD_PX or halo % SIZE_MULTIPLE:
        raise ValueError(f"halo must be a multiple of {SIZE_MULTIPLE} and at least the network's receptive-field "
                         f"radius {RECEPTIVE_FIELD_PX} px, got {halo}")
    return halo


def block_grid(height: int, width: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[Core]:
    """The cores of the blocks that tile a height x width plane, in raster order."""
    block_size = check_block_size(block_size)
    return [(y, min(y + block_size, height), x, min(x + block_size, width))
            for y in range(0, height, block_size) for x in range(0, width, block_size)]


def _expand(core: Core, by: int, height: int, width: int) -> Core:
    y0, y1, x0, x1 = core
    return max(y0 - by, 0), min(y1 + by, height), max(x0 - by, 0), min(x1 + by, width)


def _slices(box: Core) -> tuple[slice, slice]:
    return slice(box[0], box[1]), slice(box[2], box[3])


def output_chunks(full_shape: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Zarr chunks for an enhanced output written in blocks: one plane, and a side that divides
    the block size, so that no two blocks ever write the same chunk."""
    side = block_size
    while side > MAX_CHUNK and side % 2 == 0 and (side // 2) % SIZE_MULTIPLE == 0:
        side //= 2
    return (1,) * (len(full_shape) - 2) + (side, side)


def detection_margin(params: DetectionParams) -> int:
    """Pixels around a block's core that detection must see for the core's spots to come out as
    in a whole-image pass (a multiple of 8)."""
    refine = 2 * int(params.window_radius)  # the spot may lie a window radius from its peak pixel
    merge = 2 * int(np.ceil(params.merge_radius))
    if params.method == "wavelet":
        reach = 2 ** (int(max(np.atleast_1d(params.scales))) + 1) + refine + merge
    else:
        reach = int(params.footprint_radius) + refine + 4 * int(np.ceil(params.min_distance)) + merge
    reach = max(reach, 16)
    return -(-reach // SIZE_MULTIPLE) * SIZE_MULTIPLE


def resolve_detection(params: DetectionParams | None = None, **overrides) -> DetectionParams:
    params = DEFAULT_DETECTION if params is None else params
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DetectionParams)}
    if unknown:
        raise TypeError(f"unknown detection parameter(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------- sources


def as_source(source):
    """An ImageSource for a path, an ImageSource, or an array (NumPy, Zarr, ...)."""
    from .io import ImageSource, open_image
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, (str, Path)):
        return open_image(source)
    return ImageSource.from_array(source)


class _Opened:
    """`with _Opened(ref) as source`: opens a path (and closes it after), passes a source through."""

    def __init__(self, ref):
        self.ref = ref
        self.owned = isinstance(ref, (str, Path))

    def __enter__(self):
        self.source = None if self.ref is None else as_source(self.ref)
        return self.source

    def __exit__(self, *exc):
        if self.owned:
            self.source.close()


def _planes(source) -> Iterator[tuple[int, ...]]:
    return np.ndindex(*source.shape[:-2])


# ---------------------------------------------------------------- the two tasks


def extrema_task(source_ref, core: Core) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane maximum and minimum (float64 arrays of the leading shape) of one block of a
    source (an ImageSource, array or path). NaN propagates, so a bad pixel cannot hide."""
    with _Opened(source_ref) as source:
        lead = source.shape[:-2]
        high, low = np.empty(lead, np.float64), np.empty(lead, np.float64)
        for plane in _planes(source):
            pixels = source.read(plane + _slices(core))
            if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
                high[plane] = low[plane] = np.nan
            else:
                high[plane], low[plane] = float(pixels.max()), float(pixels.min())
        return high, low


@dataclass
class BlockSpec:
    """What block_task needs besides the block: live objects in a local run, paths on a cluster."""

    source: object                       # ImageSource / array, or a path a worker opens
    enhance: bool = True                 # False: the source is already enhanced (detect only)
    model: object = None                 # a Model (local); None on a worker: loaded from weights
    weights: str | None = None
    device: str = "auto"                 # with precision: how a worker loads the model (Model.load)
    precision: str = "float32"
    max_values: np.ndarray | None = None  # per-plane maximum of the whole image (enhance)
    detection: DetectionParams | None = None
    raw: object = None                   # detect only: the raw image sampled for intensities
    target: object = None                # array to write the enhanced core into, or a Zarr path
    return_core: bool = False            # return the enhanced core (for a target on the client)
    halo: int = HALO_PX
    margin: int = 0
    tile_size: int | None = DEFAULT_TILE_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    cancel: Callable[[], bool] | None = field(default=None, repr=False)

    def for_workers(self) -> "BlockSpec":
        """A copy without live objects, to ship to Dask workers (the paths must be valid there)."""
        for name in ("source", "raw", "target"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"a block spec for workers needs a path as {name}, not {type(value).__name__}")
        return dataclasses.replace(self, model=None, cancel=None)


@dataclass
class BlockResult:
    core: Core
    spots: Spots | None = None
    enhanced: np.ndarray | None = None  # the enhanced core, when asked for


def block_task(spec: BlockSpec, core: Core) -> BlockResult:
    """Enhances and/or detects one block (see the module docstring); writes the enhanced core
    into spec.target when one is given; returns the core's spots in whole-image coordinates."""
    model = spec.model
    if spec.enhance and model is None:
        model = Model.cached(spec.weights, device=spec.device, precision=spec.precision)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(_Opened(spec.source))
        raw_source = stack.enter_context(_Opened(spec.raw))
        height, width = source.shape[-2:]
        lead = source.shape[:-2]
        region = _expand(core, spec.margin, height, width) if spec.detection is not None else core
        crop_shape = (region[1] - region[0], region[3] - region[2])
        enhanced = np.empty(lead + crop_shape, np.float32) if spec.enhance else None
        raw = None
        for plane in _planes(source):
            if spec.cancel is not None and spec.cancel():
                raise Cancelled("cancelled")
            if spec.enhance:
                window = _expand(region, spec.halo, height, width)
                pixels = source.read(plane + _slices(window))
                max_value = float(spec.max_values[plane])
                out = model.enhance(pixels, tile_size=spec.tile_size, batch_size=spec.batch_size,
                                    max_value=max_value, cancel=spec.cancel)
                crop = (slice(region[0] - window[0], region[1] - window[0]),
                        slice(region[2] - window[2], region[3] - window[2]))
                enhanced[plane] = out[crop]
                if spec.detection is not None:
                    if raw is None:
                        raw = np.empty(lead + crop_shape, pixels.dtype)
                    raw[plane] = pixels[crop]
            elif spec.detection is not None:
                pixels = source.read(plane + _slices(region))
                if enhanced is None:
                    enhanced = np.empty(lead + crop_shape, pixels.dtype)
                enhanced[plane] = pixels
                if raw_source is not None:
                    raw_pixels = raw_source.read(plane + _slices(region))
                    if raw is None:
                        raw = np.empty(lead + crop_shape, raw_pixels.dtype)
                    raw[plane] = raw_pixels
        result = BlockResult(core)
        if spec.detection is not None:
            spots = detect_spots(enhanced, raw=raw, params=spec.detection)
            result.spots = _keep_core(spots, core, region)
        if spec.enhance and (spec.target is not None or spec.return_core):
            inner = (slice(core[0] - region[0], core[1] - region[0]), slice(core[2] - region[2], core[3] - region[2]))
            core_pixels = np.ascontiguousarray(enhanced[(Ellipsis,) + inner])
            if spec.target is not None:
                _write_core(spec.target, source, core, core_pixels)
            if spec.return_core:
                result.enhanced = core_pixels
        return result


def _write_core(target, source, core: Core, pixels: np.ndarray) -> None:
    key = source.full_key((slice(None),) * (source.ndim - 2) + _slices(core))
    if isinstance(target, (str, Path)):
        from .io import open_zarr_for_writing
        target = open_zarr_for_writing(target)
    try:
        target[key] = pixels
    except (OSError, ValueError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - stores raise their own kinds
        raise OSError(f"cannot write block {core} of the enhanced image: {type(exc).__name__}: {exc}") from exc


def _keep_core(spots: Spots, core: Core, region: Core) -> Spots:
    """The spots whose rounded position lies in the core, moved to whole-image coordinates."""
    coords = spots.coords
    if len(coords) == 0:
        return spots
    local_y, local_x = coords[:, -2], coords[:, -1]
    # the C core rounds with lround (half away from zero); positions are >= 0
    row = np.floor(local_y + 0.5) + region[0]
    col = np.floor(local_x + 0.5) + region[2]
    keep = (row >= core[0]) & (row < core[1]) & (col >= core[2]) & (col < core[3])
    shifted = coords[keep].copy()
    # as float32, like a whole-image pass, whose coordinates are float32 in the C core
    shifted[:, -2] = (shifted[:, -2] + region[0]).astype(np.float32)
    shifted[:, -1] = (shifted[:, -1] + region[2]).astype(np.float32)
    return Spots(coords=shifted, score=spots.score[keep], intensity=spots.intensity[keep], size=spots.size[keep])


def merge_spots(parts: Iterable[Spots | None], ndim: int) -> Spots:
    """One table from the blocks' spots, strongest first and ties in (z,) y, x order: for the
    peak detector without subpixel refinement this is the order of a whole-image pass."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return Spots(coords=np.zeros((0, ndim)), score=np.zeros(0), intensity=np.zeros(0), size=np.zeros(0))
    coords = np.concatenate([p.coords for p in parts])
    score = np.concatenate([p.score for p in parts])
    intensity = np.concatenate([p.intensity for p in parts])
    size = np.concatenate([p.size for p in parts])
    order = np.lexsort(tuple(coords[:, i] for i in reversed(range(coords.shape[1]))) + (-score,))
    return Spots(coords=coords[order], score=score[order], intensity=intensity[order], size=size[order])


# ---------------------------------------------------------------- driving the tasks


Mapper = Callable[[Callable, list], Iterator]  # (function, argument tuples) -> results in order


def local_mapper(cancel: Callable[[], bool] | None = None) -> Mapper:
    """Runs the tasks one after the other in this process (the C core uses every core)."""

    def run(function, items):
        for item in items:
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            yield function(*item)

    return run


class _Steps:
    """progress(done, total) over the extrema pass and the block pass together."""

    def __init__(self, total: int, progress):
        self.done, self.total, self.progress = 0, total, progress

    def wrap(self, results: Iterator) -> Iterator:
        for result in results:
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total)
            yield result


def whole_image_extrema(source, block_size: int, mapper: Mapper, source_ref=None,
                        steps: _Steps | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane maximum and minimum of the whole image, from one pass over its blocks."""
    cores = block_grid(*source.shape[-2:], block_size)
    ref = source if source_ref is None else source_ref
    results = mapper(extrema_task, [(ref, core) for core in cores])
    if steps is not None:
        results = steps.wrap(results)
    high = np.full(source.shape[:-2], -np.inf)
    low = np.full(source.shape[:-2], np.inf)
    for block_high, block_low in results:
        nan = np.isnan(high) | np.isnan(block_high)
        high = np.where(nan, np.nan, np.fmax(high, block_high))
        low = np.fmin(low, block_low)
    return np.asarray(high), np.asarray(low)


def check_extrema(high: np.ndarray, low: np.ndarray) -> None:
    """The checks Model.enhance makes of each plane (images.scale_plane), for the whole image."""
    for plane in np.ndindex(*high.shape):
        where = "image" if high.size == 1 else f"plane {plane if len(plane) > 1 else plane[0]} of the stack"
        peak, floor = high[plane], low[plane]
        if not np.isfinite(peak):
            raise ValueError(f"{where} contains NaN or Inf values; expected finite intensities")
        if peak <= 0:
            raise ValueError(f"{where} has maximum {peak}; the reference scaling divides by the maximum, so an "
                             "all-zero or non-positive image cannot be enhanced")
        if peak == floor:
            raise ValueError(f"{where} is constant (every pixel is {peak}): there is nothing to enhance")


def run_blocks(source, *, model=None, enhance: bool = True, target=None, detection: DetectionParams | None = None,
               raw=None, block_size: int = DEFAULT_BLOCK_SIZE, halo: int = HALO_PX,
               tile_size: int | None = DEFAULT_TILE_SIZE,
               batch_size: int = DEFAULT_BATCH_SIZE, mapper: Mapper | None = None, source_ref=None, raw_ref=None, target_ref=None,
               weights: str | None = None, device: str = "auto", precision: str = "float32",
               progress: Callable[[int, int], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> Spots | None:
    """Enhances (enhance=True, with `model`) and/or detects (`detection` set) every block of
    `source`, writing the enhanced cores into `target` (an array of the source's full shape) if
    given; returns the spots (None without detection).

    mapper: how the tasks run (default: here, one after the other). A distributed mapper gets
    the task functions with source_ref/raw_ref/target_ref (paths its workers open) in place of
    the live source, raw and target, and weights/device/precision in place of the model."""
    source = as_source(source)
    block_size = check_block_size(block_size)
    halo = check_halo(halo)
    if detection is not None and source.ndim > 3:
        raise ValueError(f"image has shape {source.shape}; detection expects a 2D image (Y, X) or a z-stack "
                         "(Z, Y, X): process it per time point or channel")
    if enhance and model is None and mapper is None:
        raise ValueError("enhancing needs a model")
    if target is not None and tuple(target.shape) != source.full_shape:
        raise ValueError(f"target has shape {tuple(target.shape)}, the image {source.full_shape}")
    remote = mapper is not None
    mapper = mapper or local_mapper(cancel=cancel)
    cores = block_grid(*source.shape[-2:], block_size)
    steps = _Steps(len(cores) * (2 if enhance else 1), progress)
    max_values = None
    if enhance:
        high, low = whole_image_extrema(source, block_size, mapper, source_ref if remote else None, steps)
        check_extrema(high, low)
        max_values = high
    collect = remote and target is not None and target_ref is None
    spec = BlockSpec(source=source_ref if remote else source, enhance=enhance, model=None if remote else model,
                     weights=weights, device=device, precision=precision, max_values=max_values, detection=detection,
                     raw=(raw_ref if remote else raw), target=target_ref if remote else target,
                     return_core=collect, halo=halo,
                     margin=detection_margin(detection) if detection is not None else 0,
                     tile_size=tile_size, batch_size=batch_size, cancel=None if remote else cancel)
    if remote:
        spec = spec.for_workers()
    results = steps.wrap(mapper(block_task, [(spec, core) for core in cores]))
    found = []
    for result in results:
        if collect:
            _write_core(target, source, result.core, result.enhanced)
        found.append(result.spots)
    if detection is None:
        return None
    return merge_spots(found, ndim=source.ndim)


def enhance_blocks(model, source, target=None, block_size: int = DEFAULT_BLOCK_SIZE, progress=None, cancel=None, *,
                   halo: int = HALO_PX, tile_size: int | None = DEFAULT_TILE_SIZE, batch_size: int = DEFAULT_BATCH_SIZE):
    """Enhances `source` (a path, an ImageSource or an array of any size; 2D or a stack) block by
    block into `target` (an array of the source's full shape, e.g. a Zarr array from
    io.create_zarr; None: a new NumPy array). Equals model.enhance(whole image). Returns target."""
    with _Opened(source) as source:
        if target is None:
            target = np.empty(source.full_shape, np.float32)
        run_blocks(source, model=model, target=target, block_size=block_size, halo=halo, tile_size=tile_size,
                   batch_size=batch_size, progress=progress, cancel=cancel)
    return target


def detect_blocks(enhanced, raw=None, block_size: int = DEFAULT_BLOCK_SIZE, progress=None, cancel=None, *,
                  params: DetectionParams = DEFAULT_DETECTION, **overrides) -> Spots:
    """Detects spots in an enhanced image (a path, ImageSource or array; 2D or a z-stack) block
    by block; `raw` (same shape) is sampled for the intensities. Equals detect_spots(enhanced,
    raw) for the peak detector, up to the spots' order (strongest first here)."""
    detection = resolve_detection(params, **overrides)
    with _Opened(enhanced) as source, _Opened(raw) as raw_source:
        return run_blocks(source, enhance=False, detection=detection, raw=raw_source, block_size=block_size,
                          progress=progress, cancel=cancel)


def enhance_detect_blocks(model, source, target=None, block_size: int = DEFAULT_BLOCK_SIZE, progress=None,
                          cancel=None, *, halo: int = HALO_PX, tile_size: int | None = DEFAULT_TILE_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
                          params: DetectionParams = DEFAULT_DETECTION, **overrides) -> Spots:
    """Enhances and detects in one pass over the blocks (the enhanced image is written into
    `target` when given, else not kept): equals model.detect(image) for the peak detector, up to
    the spots' order."""
    detection = resolve_detection(params, **overrides)
    with _Opened(source) as source:
        return run_blocks(source, model=model, target=target, detection=detection, block_size=block_size, halo=halo,
                          tile_size=tile_size, batch_size=batch_size, progress=progress, cancel=cancel)


# ---------------------------------------------------------------- one input file, as the CLI runs it


@dataclass
class FileJob:
    """One input and its outputs. targets: "enhanced" (a .tif/.tiff or .zarr path) and/or
    "spots" (a .csv path), and "overlay" (a .png of the spots, overlay.draw_overlay; images
    processed in memory only). enhance=False: the input is already enhanced (detect only)."""

    path: str
    targets: dict[str, str]
    enhance: bool = True
    detect: bool = True
    tile_size: int | None = DEFAULT_TILE_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    detection: dict = field(default_factory=dict)  # overrides of DEFAULT_DETECTION
    block_size: int | None = None  # None: blocks only for Zarr inputs and images over LARGE_IMAGE_PIXELS
    halo: int = HALO_PX
    overwrite: bool = False        # replace outputs that exist (the CLI checks before it starts)
    weights: str | None = None     # the model, for Dask workers: Model.load(weights, device=, precision=)
    device: str = "auto"
    precision: str = "float32"


def blocked_size(path: str | Path, block_size: int | None = None) -> int | None:
    """The block size to process `path` with, or None to process it in memory: always blocks for
    Zarr inputs, images over LARGE_IMAGE_PIXELS, or when a block size is given."""
    from .io import image_shape, is_zarr
    if block_size is not None:
        return check_block_size(block_size)
    if is_zarr(path):
        return DEFAULT_BLOCK_SIZE
    try:
        shape, _ = image_shape(path)
    except (ValueError, OSError):
        return None  # the in-memory path reports it
    return DEFAULT_BLOCK_SIZE if int(np.prod(shape, dtype=np.int64)) > LARGE_IMAGE_PIXELS else None


def enhanced_suffix(path: str | Path, output_format: str = "auto") -> str:
    """".zarr" or ".tif" for the enhanced version of `path`: Zarr when asked, or (auto) when the
    input is Zarr or larger than LARGE_IMAGE_PIXELS."""
    from .io import image_shape, is_zarr
    if output_format not in ("auto", "tiff", "zarr"):
        raise ValueError(f"output format must be auto, tiff or zarr, not {output_format!r}")
    if output_format != "auto":
        return ".zarr" if output_format == "zarr" else ".tif"
    if is_zarr(path):
        return ".zarr"
    try:
        shape, _ = image_shape(path)
    except (ValueError, OSError):
        return ".tif"
    return ".zarr" if int(np.prod(shape, dtype=np.int64)) > LARGE_IMAGE_PIXELS else ".tif"


def _is_zarr_target(target: str | Path) -> bool:
    return Path(target).suffix.lower() == ".zarr"


def process_file(job: FileJob, model=None, progress: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool] | None = None, mapper: Mapper | None = None) -> str:
    """Reads job.path, enhances (job.enhance) and/or detects (job.detect), writes the targets
    atomically; returns a one-line summary. A raw image processed in memory that is too small or
    pure noise (images.unlikely_input) gets an UnlikelyInputWarning. Small images go through memory (Model.enhance,
    Model.detect), Zarr and large ones through run_blocks. mapper: see run_blocks (Dask)."""
    if job.enhance and model is None and mapper is None:
        model = Model.cached(job.weights, device=job.device, precision=job.precision)
    block_size = blocked_size(job.path, job.block_size)
    if block_size is None:
        return _process_in_memory(job, model, progress, cancel)
    return _process_blocked(job, model, block_size, progress, cancel, mapper)


def _job_detection(job: FileJob, model) -> DetectionParams | None:
    """What job detects with: the enhancing model's own detection defaults (where no model is at
    hand, on workers or for images enhanced earlier: its weights file's) with the job's overrides."""
    if not job.detect:
        return None
    return resolve_detection(model.detection if model is not None else detection_defaults(job.weights), **job.detection)


def _process_in_memory(job: FileJob, model, progress, cancel) -> str:
    from .images import UnlikelyInputWarning, as_image_stack, unlikely_input
    from .io import read_image, write_spots_table, write_tiff, write_zarr
    image = read_image(job.path)
    enhanced = None
    detection = _job_detection(job, model)
    if job.enhance:
        for reason in unlikely_input(as_image_stack(image)):  # the spots are still found and written
            warnings.warn(reason, UnlikelyInputWarning, stacklevel=2)
        enhanced = model.enhance(image, tile_size=job.tile_size, batch_size=job.batch_size, progress=progress,
                                 cancel=cancel)
    detail = None
    if detection is not None:
        if job.enhance:
            spots = model.detect(image, enhanced=enhanced, params=detection)
        else:  # an image enhanced earlier
            spots = detect_spots(image, params=detection)
        detail = f"{len(spots)} spots -> {Path(job.targets['spots']).name}"
    if "enhanced" in job.targets:
        target = job.targets["enhanced"]
        if _is_zarr_target(target):
            chunks = (1,) * (enhanced.ndim - 2) + (MAX_CHUNK, MAX_CHUNK)
            write_zarr(target, enhanced, chunks=chunks, overwrite=job.overwrite)
        else:
            write_tiff(target, enhanced)
        detail = detail or f"{enhanced.shape} -> {Path(target).name}"
    if job.detect:
        write_spots_table(job.targets["spots"], spots.as_table())
    if "overlay" in job.targets:
        from .overlay import draw_overlay
        draw_overlay(image, spots.coords, job.targets["overlay"])
    return detail


def _process_blocked(job: FileJob, model, block_size: int, progress, cancel, mapper) -> str:
    from .io import atomic_zarr, create_zarr, open_image, write_spots_table, write_tiff
    detection = _job_detection(job, model)
    remote = mapper is not None
    with open_image(job.path) as source:
        n_blocks = len(block_grid(*source.shape[-2:], block_size))
        common = dict(model=model, enhance=job.enhance, detection=detection, block_size=block_size, halo=job.halo,
                      tile_size=job.tile_size, batch_size=job.batch_size, mapper=mapper,
                      source_ref=str(job.path) if remote else None, weights=job.weights, device=job.device,
                      precision=job.precision,
                      progress=progress, cancel=cancel)
        if detection is not None and source.ndim > 3:
            raise ValueError(f"image has shape {source.shape}; detection expects a 2D image (Y, X) or a z-stack "
                             "(Z, Y, X): process it per time point or channel")
        target_path = job.targets.get("enhanced") if job.enhance else None
        if target_path is not None and _is_zarr_target(target_path):
            with atomic_zarr(target_path, overwrite=job.overwrite) as tmp:
                array = create_zarr(tmp, source.full_shape, np.float32, output_chunks(source.full_shape, block_size),
                                    axes=source.axes, name=Path(target_path).stem)
                spots = run_blocks(source, target=array, target_ref=str(tmp) if remote else None, **common)
        elif target_path is not None:
            array = np.zeros(source.full_shape, np.float32)
            spots = run_blocks(source, target=array, **common)
            write_tiff(target_path, array)
        else:
            spots = run_blocks(source, **common)
        shape = source.full_shape
    blocks = f"{n_blocks} block{'s' if n_blocks > 1 else ''} of {block_size} px"
    if spots is not None:
        write_spots_table(job.targets["spots"], spots.as_table())
        return f"{len(spots)} spots -> {Path(job.targets['spots']).name} ({blocks})"
    return f"{shape} -> {Path(target_path).name} ({blocks})"
