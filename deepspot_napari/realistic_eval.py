"""The realistic benchmark (`deepspot evaluate --realistic`): models and peers scored on images of
the realistic recipe (realistic.py) that no training run sees.

Test family, regenerated from fixed seeds (SeedSequence([seed, 0x5EA1, part, set, image])), streams
disjoint from every training and validation set (those use SeedSequence(<their seed>).spawn):

* ``snr<k>``: SNR bins (REALISTIC_SNR_BINS): every spot of an image at exactly that SNR, 20-80
  spots per 256x256 image, all background kinds;
* ``density_<label>``: sparse, medium, crowded (REALISTIC_DENSITIES), SNR log-uniform 3-20;
* ``noise_only`` and ``backgrounds_only``: no spot at all; what counts is the false detections per
  image.

Real backgrounds: the bottom-right quarters (realistic.split_source "test") of the real images in
REAL_BACKGROUND_FILES (training used their left halves, validation their top-right quarters). Where
they are missing (no realdata folder), the family uses the synthetic kinds only, and says so.

Rows: any number of DeepSpot models with the fixed detector, Big-FISH's automatic LoG
(evaluate.bigfish_method), and U-FISH's published generalist model run the way its own package
runs it (ufish_method).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import evaluate
from .detect import DetectionParams, detect_spots
from .realistic import BACKGROUND_KINDS, background_sources, realistic_image

REAL_BACKGROUND_FILES = ("unannotated/spotiflow_img_hybiss_2d.tif", "unannotated/ufish_sample1.tif",
                         "unannotated/spotiflow_img_terra_2d.tif")
REALISTIC_SNR_BINS = (2, 3, 5, 8, 12, 20)
REALISTIC_DENSITIES = (("sparse", (10, 30)), ("medium", (50, 100)), ("crowded", (150, 250)))
MIXED_SNR = (3.0, 20.0)
SNR_SPOTS = (20, 80)
TEST_IMAGES = 20
UFISH_ONNX = "ufish/v1.0-alldata-ufish_c32.onnx"
UFISH_THRESHOLD = 0.5  # call_spots_local_maxima's default intensity_threshold


def default_realdata() -> Path:
    return Path(os.environ.get("DEEPSPOT_REALDATA", "../shared/realdata"))


def default_peers() -> Path:
    return Path(os.environ.get("DEEPSPOT_PEERS", "../shared/peers"))


def real_background_sources(realdata: str | os.PathLike | None, part: str) -> tuple[list[np.ndarray], str | None]:
    """(level maps of the REAL_BACKGROUND_FILES' `part`, None) or ([], why they are not used)."""
    from .io import read_image
    if realdata is None:
        return [], "no realdata folder given: synthetic backgrounds only"
    paths = [Path(realdata) / name for name in REAL_BACKGROUND_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return [], f"real backgrounds missing ({', '.join(missing)}): synthetic backgrounds only"
    return background_sources([np.asarray(read_image(p)) for p in paths], part), None


def _dataset(name: str, group: str, key: Sequence[int], n_images: int, size: int, sources, kinds, **recipe):
    def samples() -> Iterator[evaluate.Sample]:
        for k in range(n_images):
            sim = realistic_image(np.random.default_rng(np.random.SeedSequence([*key, k])), size, sources=sources,
                                  kinds=kinds, **recipe)
            yield evaluate.Sample(f"{name}/{k:03d}", sim.image, sim.spots)
    return evaluate.Dataset(name, n_images, samples, group=group)


def realistic_datasets(sources=(), seed: int = evaluate.TEST_SEED, n_images: int = TEST_IMAGES,
                       size: int = 256) -> list[evaluate.Dataset]:
    """The SNR-bin and density sets (module docstring)."""
    kinds = tuple(k for k in BACKGROUND_KINDS if k not in ("flat",) and (k != "real" or len(sources)))
    sets = [_dataset(f"snr{snr}", "realistic, SNR bins", [seed, 0x5EA1, 0, i], n_images, size, sources, kinds,
                     n_spots=SNR_SPOTS, snr=(float(snr), float(snr)))
            for i, snr in enumerate(REALISTIC_SNR_BINS)]
    sets += [_dataset(f"density_{label}", "realistic, densities", [seed, 0x5EA1, 1, i], n_images, size, sources,
                      kinds, n_spots=counts, snr=MIXED_SNR)
             for i, (label, counts) in enumerate(REALISTIC_DENSITIES)]
    return sets


def empty_datasets(sources=(), seed: int = evaluate.TEST_SEED, n_images: int = TEST_IMAGES,
                   size: int = 256) -> list[evaluate.Dataset]:
    """Images without spots: camera noise on a flat background, and structured backgrounds."""
    kinds = tuple(k for k in BACKGROUND_KINDS if k != "flat" and (k != "real" or len(sources)))
    return [_dataset("noise_only", "no spots", [seed, 0x5EA1, 2, 0], n_images, size, sources, ("flat",), n_spots=0),
            _dataset("backgrounds_only", "no spots", [seed, 0x5EA1, 2, 1], n_images, size, sources, kinds, n_spots=0)]


# ---- methods ----------------------------------------------------------------------------------------
def model_method(model, name: str, label: str, params: DetectionParams | None = None) -> evaluate.Method:
    """A DeepSpot model (its own, not the evaluation's) with a detector setting (None: the model's
    own defaults, Model.detection)."""
    params = model.detection if params is None else params
    return evaluate.Method(name, label, lambda s, e: detect_spots(model.enhance(s.image), params=params).coords)


def ufish_scale(image: np.ndarray) -> np.ndarray:
    """U-FISH's input scaling (ufish/utils/misc.py scale_image, as its API calls it): float32 to
    0..255 over the image's range, or over 0..the 99.99th percentile when the maximum exceeds twice
    that (an outlier), clipped. (Its uint8 test compares a dtype to a type, so uint8 images are
    rescaled too.)"""
    from skimage.exposure import rescale_intensity
    img = np.asarray(image, np.float32)
    big = float(np.quantile(img, 0.9999))
    in_range = (0.0, big) if float(img.max()) - big > big else "image"
    return rescale_intensity(img, in_range=in_range, out_range=(0, 255)).astype(np.float32)


def ufish_call_spots(enhanced: np.ndarray, threshold: float = UFISH_THRESHOLD) -> np.ndarray:
    """U-FISH's default spot calling (ufish/utils/spot_calling.py call_spots_local_maxima): local
    maxima (8-connectivity) of the Laplace-filtered enhanced image above the threshold."""
    from skimage.filters import laplace
    from skimage.morphology import local_maxima
    lap = laplace(enhanced)
    mask = local_maxima(lap, connectivity=2) & (lap > threshold)
    return np.argwhere(mask).astype(float)


def ufish_method(onnx_path: str | os.PathLike) -> evaluate.Method:
    """U-FISH's published generalist model (v1.0-alldata-ufish_c32, ONNX, onnxruntime on the CPU) in
    its own pipeline: ufish_scale, the network on the whole image (zero-padded to a multiple of 8, as
    its chunked prediction pads), ufish_call_spots. Raises ImportError without onnxruntime."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def detect(sample, enhanced) -> np.ndarray:
        img = ufish_scale(sample.image)
        h, w = img.shape
        padded = np.zeros((-(-h // 8) * 8, -(-w // 8) * 8), np.float32)
        padded[:h, :w] = img
        out = session.run(None, {input_name: padded[None, None]})[0][0, 0, :h, :w]
        return ufish_call_spots(out)

    return evaluate.Method("U-FISH generalist (v1.0, its own pipeline)", "U-FISH", detect)


def peer_methods(peers: str | os.PathLike | None) -> tuple[list[evaluate.Method], list[str]]:
    """The U-FISH row, or a note saying why it is left out."""
    if peers is None:
        return [], ["U-FISH row skipped: no peers folder given"]
    path = Path(peers) / UFISH_ONNX
    if not path.is_file():
        return [], [f"U-FISH row skipped: {path} not found"]
    try:
        return [ufish_method(path)], []
    except ImportError:
        return [], ["U-FISH row skipped: onnxruntime is not installed (pip install onnxruntime, or the bench extra)"]


# ---- the report -------------------------------------------------------------------------------------
def false_detections_table(results: evaluate.Results) -> list[str]:
    header = ["method"] + [f"{name} ({n} img): false detections / image" for name, _, n in results.datasets]
    rows = []
    for m in results.methods:
        row = [m]
        for name, _, _ in results.datasets:
            s = results.summary(m, "fp", [name])
            row.append("-" if s is None else f"{s.mean:.2f} (max {results.values(m, 'fp', [name]).max():.0f})")
        rows.append(row)
    return evaluate._table(header, rows)


def snr_table(results: evaluate.Results, metric: str = "f1") -> list[str]:
    names = [name for name, group, _ in results.datasets if group == "realistic, SNR bins"]
    header = ["method"] + [f"SNR {name[3:]}" for name in names] + ["all SNR >= 3", "all SNR >= 5"]
    rows = []
    for m in results.methods:
        row = [m] + [evaluate._format(results.summary(m, metric, [n]), metric) for n in names]
        for lo in (3, 5):
            row.append(evaluate._format(results.summary(m, metric, [n for n in names if int(n[3:]) >= lo]), metric))
        rows.append(row)
    return evaluate._table(header, rows)
