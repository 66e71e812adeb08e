"""Accuracy evaluation against annotated spots, the paper's way (docs/reference_model.md section 4).

For every image of every data set, and for every method (a row of the report: DeepSpot with the
fixed detector, the same detector on the raw image, Big-FISH), this computes:

* F1, precision, recall and ambiguous matches (AM) per image with the paper's protocol (each
  annotation takes its nearest detection within 3 px: metrics.match_nearest);
* the one-to-one (Hungarian) F1 at 3 px and the F1 integral over 0..3 px (metrics.match_hungarian,
  metrics.f1_integral);
* the spot intensity: the mean, over the annotated spots, of the method's image at the annotated
  pixel on the 0..255 scale (for DeepSpot the enhanced image: the paper's Table 2; for the raw
  baseline the raw image divided by its maximum, for comparison);

then, per data set, per group of data sets (DS_fixed, DS_var) and over all images, the mean with
its 95% confidence interval (metrics.summarize). Images are streamed: one enhanced image is held
at a time, and one raw image (a simulated set's 40 raw images, 2.6 MB, are generated together).

Data sets are folders of images with ground-truth CSVs (``images/`` + ``csv/`` as written by
simulate.simulate_dataset, or images and CSVs paired by file stem), or the paper's simulated test
sets DS_fixed^i / DS_var^i (i = 10..100) regenerated from fixed seeds (``simulated_datasets``).

Outputs (``write_report``): a Markdown report laid out like the paper's Tables 2-4, a summary CSV,
a per-image CSV and a heat map PNG of F1 per method x data set (the paper's Figure 5).
"""
from __future__ import annotations

import csv
import io as _io
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from . import metrics
from .detect import DEFAULT_DETECTION, DetectionParams, detect_spots
from .model import DEFAULT_TILE_SIZE
from .io import IMAGE_SUFFIXES, atomic_write, read_image, write_bytes
from .simulate import paper_test_sets, read_spots_csv, simulate_image

# Seeds of the simulated data. The test sets are simulate.paper_test_sets(TEST_SEED); the
# detection defaults were chosen on VALIDATION_SEED data only (tools/choose_detection_defaults.py).
TEST_SEED = 0
VALIDATION_SEED = 1
PAPER_TEST_IMAGES = 40

# Big-FISH baseline: LoG sigma and minimum distance in pixels. Big-FISH derives both from
# spot_radius / voxel_size; the simulated spots have sigma 1..2.25 px (DS sets: diameter 4..9 px,
# sigma = diameter / 4; the code recipe 0.8..2.25 px). 1.5 px is the middle of that range and the
# best of 1.0..2.0 px on the validation data (docs/detection_defaults.md).
BIGFISH_SPOT_RADIUS_PX = 1.5
BIGFISH_VOXEL_SIZE_NM = 100.0

METRICS = ("f1", "precision", "recall", "ambiguous", "f1_one_to_one", "f1_integral", "spot_intensity", "fp", "seconds")
METRIC_TITLES = {
    "f1": "F1 (%)", "precision": "precision (%)", "recall": "recall (%)", "ambiguous": "AM/img",
    "f1_one_to_one": "one-to-one F1 (%)", "f1_integral": "F1 integral 0-3 px (%)",
    "spot_intensity": "spot intensity (0-255)", "fp": "false detections/img", "seconds": "s/img",
}
_PERCENT = {"f1", "precision", "recall", "f1_one_to_one", "f1_integral"}


# --------------------------------------------------------------------------------------------
# data sets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One annotated image: name, the image (2D) and its ground truth, (n, 2) (y, x) in pixels."""

    name: str
    image: np.ndarray
    truth: np.ndarray


@dataclass
class Dataset:
    """A named, re-iterable sequence of Samples, produced lazily (one image in memory at a time).
    group: data sets of one group (DS_fixed_10 ... DS_fixed_100) are also summarised together."""

    name: str
    count: int
    samples: Callable[[], Iterator[Sample]] = field(repr=False)
    group: str | None = None

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def __len__(self) -> int:
        return self.count


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def check_truth(truth: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Ground truth must be finite (y, x) positions inside an image of `shape`."""
    truth = np.asarray(truth, dtype=float).reshape(-1, 2)
    if not np.all(np.isfinite(truth)):
        raise ValueError(f"{where}: ground truth has NaN or infinite coordinates")
    outside = (truth < -0.5) | (truth > np.asarray(shape[:2]) - 0.5)
    if outside.any():
        row = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ValueError(f"{where}: {int(outside.any(axis=1).sum())} annotated spot(s) lie outside the image of shape "
                         f"{shape} (first: y={truth[row, 0]:g}, x={truth[row, 1]:g}); is the CSV the ground truth of "
                         "another image, or in x,y order without a header?")
    return truth


def folder_dataset(images: str | Path, csvs: str | Path | None = None, name: str | None = None) -> Dataset:
    """Images paired with ground-truth CSVs by file stem.

    images: a folder with ``images/`` and ``csv/`` subfolders (simulate_dataset's layout), or a
    folder of images; csvs: the folder of CSVs (default: ``<images>/csv`` for the first layout,
    else the images' own folder). Every image needs a CSV and every CSV an image: any left over is
    an error naming them. CSVs are read with simulate.read_spots_csv (header ``y,x`` or ``x,y``;
    none = the authors' ``x,y``)."""
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder not found: {root}")
    image_dir = root / "images" if (root / "images").is_dir() else root
    if csvs is None:
        csv_dir = root / "csv" if (root / "csv").is_dir() else image_dir
    else:
        csv_dir = Path(csvs)
        if not csv_dir.is_dir():
            raise FileNotFoundError(f"ground-truth folder not found: {csv_dir}")
    image_files: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            if path.stem in image_files:
                first = image_files[path.stem].name
                raise ValueError(f"{image_dir}: two images share the stem '{path.stem}' ({first}, {path.name}); "
                                 "which one the CSV belongs to is unclear")
            image_files[path.stem] = path
    csv_files = {p.stem: p for p in sorted(csv_dir.iterdir()) if p.suffix.lower() == ".csv" and p.is_file()}
    if not image_files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    if not csv_files:
        raise ValueError(f"no ground-truth CSV files in {csv_dir}")
    orphans = sorted(set(csv_files) - set(image_files), key=_natural_key)
    unannotated = sorted(set(image_files) - set(csv_files), key=_natural_key)
    if orphans or unannotated:
        def listed(stems, files):
            return ", ".join(files[s].name for s in stems[:5]) + (" ..." if len(stems) > 5 else "")
        parts = []
        if orphans:
            parts.append(f"{len(orphans)} CSV(s) without a matching image: {listed(orphans, csv_files)}")
        if unannotated:
            parts.append(f"{len(unannotated)} image(s) without a ground-truth CSV: {listed(unannotated, image_files)}")
        raise ValueError(f"{image_dir} has {len(image_files)} images and {csv_dir} has {len(csv_files)} CSVs, "
                         f"paired by file stem: {'; '.join(parts)}")
    stems = sorted(image_files, key=_natural_key)
    dataset_name = name or (root.name if image_dir == root or root.name not in ("", ".") else root.resolve().name)

    def samples() -> Iterator[Sample]:
        for stem in stems:
            yield _read_sample(image_files[stem], csv_files[stem])

    return Dataset(dataset_name, len(stems), samples)


def _read_sample(image_path: Path, csv_path: Path) -> Sample:
    """One annotated image from its file and its ground-truth CSV, checked."""
    image = np.asarray(read_image(image_path))
    if image.ndim != 2:
        raise ValueError(f"{image_path}: evaluation needs 2D greyscale images, this one has shape {image.shape}")
    try:
        truth = read_spots_csv(csv_path)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{csv_path}: not a spots CSV ({exc})") from exc
    return Sample(image_path.name, image, check_truth(truth, image.shape, str(csv_path)))


def file_dataset(image: str | Path, csv_path: str | Path, name: str | None = None) -> Dataset:
    """One image file with its ground-truth CSV (read as folder_dataset reads them)."""
    image, csv_path = Path(image), Path(csv_path)
    for path in (image, csv_path):
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")

    def samples() -> Iterator[Sample]:
        yield _read_sample(image, csv_path)

    return Dataset(name or image.stem, 1, samples)


def parse_dataset_spec(spec: str) -> Dataset:
    """``[NAME=]FOLDER[,CSV_FOLDER]`` (see folder_dataset) or ``[NAME=]IMAGE_FILE,CSV_FILE``."""
    name = None
    if "=" in spec and not Path(spec).exists():
        name, spec = spec.split("=", 1)
    images, _, csvs = spec.partition(",")
    if Path(images).is_file():
        if not csvs:
            raise ValueError(f"{images} is a file: give its ground truth too, as IMAGE_FILE,CSV_FILE")
        return file_dataset(images, csvs, name=name or None)
    return folder_dataset(images, csvs or None, name=name or None)


def simulated_datasets(seed: int = TEST_SEED, n_images: int = PAPER_TEST_IMAGES, size: int = 256,
                       names: Sequence[str] | None = None) -> list[Dataset]:
    """The paper's test sets DS_fixed^i and DS_var^i, i = 10..100 (simulate.paper_test_sets with
    `seed`), each regenerated lazily when iterated."""
    from .simulate import paper_test_set_names
    wanted = paper_test_set_names() if names is None else list(names)
    datasets = []
    for set_name in wanted:
        def samples(set_name=set_name) -> Iterator[Sample]:
            for _, images, spots in paper_test_sets(seed=seed, n_images=n_images, size=size, names=[set_name]):
                for k, (image, truth) in enumerate(zip(images, spots)):
                    yield Sample(f"{set_name}/{k:03d}", image, truth)
        datasets.append(Dataset(set_name, int(n_images), samples, group=set_name.rsplit("_", 1)[0]))
    unknown = [n for n in wanted if n not in paper_test_set_names()]
    if unknown:
        raise ValueError(f"unknown simulated test sets {unknown}; expected names from {paper_test_set_names()}")
    return datasets


def code_recipe_dataset(seed: int, n_images: int, n_spots=(10, 100), size: int = 256, name: str = "code") -> Dataset:
    """Images of the authors' script recipe ("code"), image k from SeedSequence([seed, 2, k])
    (family 2: paper_test_sets uses 0 and 1)."""
    def samples() -> Iterator[Sample]:
        for k in range(n_images):
            image, truth = simulate_image(np.random.default_rng(np.random.SeedSequence([seed, 2, k])), "code",
                                          tuple(n_spots), size)
            yield Sample(f"{name}/{k:03d}", image, truth)
    return Dataset(name, n_images, samples)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
@dataclass
class Method:
    """A row of the report. detect(sample, enhanced) -> (n, 2) (y, x) detections; `enhanced` is
    the network's output when needs_enhanced, else None. spot_image(sample, enhanced) -> the
    image in [0, 1] whose value at the annotated spots is the spot intensity, or None."""

    name: str
    label: str  # short, for the heat map
    detect: Callable[[Sample, np.ndarray | None], np.ndarray]
    needs_enhanced: bool = False
    spot_image: Callable[[Sample, np.ndarray | None], np.ndarray | None] | None = None


def scaled_to_max(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    peak = float(image.max())
    return image / peak if peak > 0 else image


def deepspot_method(params: DetectionParams = DEFAULT_DETECTION, name: str | None = None) -> Method:
    return Method(name or "DeepSpot (ours, bundled weights) + fixed detector", "DeepSpot + detector",
                  lambda s, e: detect_spots(e, params=params).coords, needs_enhanced=True,
                  spot_image=lambda s, e: e)


def raw_detector_method(params: DetectionParams = DEFAULT_DETECTION) -> Method:
    return Method("same detector on the raw image (scaled to [0,1] by its max)", "detector on raw",
                  lambda s, e: detect_spots(scaled_to_max(s.image), params=params).coords,
                  spot_image=lambda s, e: scaled_to_max(s.image))


def bigfish_available() -> bool:
    try:
        import bigfish.detection  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def bigfish_method(spot_radius_px: float = BIGFISH_SPOT_RADIUS_PX) -> Method:
    """Big-FISH's LoG + local maxima detector with its automatic threshold (computed per image),
    voxel size BIGFISH_VOXEL_SIZE_NM and spot radius spot_radius_px * voxel size, so that its LoG
    sigma and minimum distance are spot_radius_px pixels. Raises ImportError without big-fish."""
    import bigfish.detection as bigfish_detection

    def detect(sample: Sample, enhanced) -> np.ndarray:
        image = sample.image
        if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
            image = image.astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # log(0) warnings of its threshold search on sparse images
            spots = bigfish_detection.detect_spots(image, threshold=None, voxel_size=BIGFISH_VOXEL_SIZE_NM,
                                                   spot_radius=spot_radius_px * BIGFISH_VOXEL_SIZE_NM)
        return np.asarray(spots, dtype=float).reshape(-1, 2)

    return Method("Big-FISH automatic-threshold LoG", "Big-FISH LoG", detect)


def default_methods(params: DetectionParams = DEFAULT_DETECTION, raw: bool = True, bigfish: bool = True,
                    bigfish_spot_radius_px: float = BIGFISH_SPOT_RADIUS_PX,
                    weights_name: str | None = None) -> tuple[list[Method], list[str]]:
    """The report's rows and notes about rows that were left out; weights_name names the DeepSpot row
    (None: the bundled weights)."""
    name = None if weights_name is None else f"DeepSpot ({weights_name}) + fixed detector"
    methods = [deepspot_method(params, name)] + ([raw_detector_method(params)] if raw else [])
    rows, notes = bigfish_rows(bigfish_spot_radius_px) if bigfish else ([], [])
    return methods + rows, notes


def bigfish_rows(spot_radius_px: float = BIGFISH_SPOT_RADIUS_PX) -> tuple[list[Method], list[str]]:
    """The Big-FISH row, or a note saying why it is left out."""
    if bigfish_available():
        return [bigfish_method(spot_radius_px)], []
    return [], ["Big-FISH row skipped: the optional package big-fish is not installed (pip install big-fish)."]


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def spot_intensity(image: np.ndarray, truth: np.ndarray) -> float:
    """Mean of image (in [0, 1]) at the annotated pixels (rounded, clipped to the image), x 255."""
    if len(truth) == 0:
        return float("nan")
    yx = np.rint(truth).astype(np.int64)
    yx[:, 0] = np.clip(yx[:, 0], 0, image.shape[0] - 1)
    yx[:, 1] = np.clip(yx[:, 1], 0, image.shape[1] - 1)
    return float(np.mean(image[yx[:, 0], yx[:, 1]]) * 255.0)


def score_image(truth, detections, intensity_image: np.ndarray | None = None) -> dict[str, float]:
    """Every per-image number of the report for one image and one method."""
    truth = np.asarray(truth, dtype=float).reshape(-1, 2)
    detections = np.asarray(detections, dtype=float).reshape(-1, 2)
    paper = metrics.match_nearest(truth, detections)
    one_to_one = metrics.match_hungarian(truth, detections)
    return dict(n_annotated=len(truth), n_detected=len(detections), tp=paper.tp, fp=paper.fp, fn=paper.fn,
                ambiguous=paper.ambiguous, f1=paper.f1, precision=paper.precision, recall=paper.recall,
                f1_one_to_one=one_to_one.f1, f1_integral=metrics.f1_integral(truth, detections),
                spot_intensity=float("nan") if intensity_image is None else spot_intensity(intensity_image, truth))


@dataclass
class Results:
    """Per-image rows (dicts with dataset, image, method and the score_image numbers, plus
    seconds: the method's time on the image, enhancement included), in the order computed."""

    rows: list[dict]
    methods: list[str]
    datasets: list[tuple[str, str | None, int]]  # (name, group, images)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)  # method name -> short label

    def values(self, method: str, metric: str, datasets: Iterable[str] | None = None) -> np.ndarray:
        keep = None if datasets is None else set(datasets)
        return np.array([r[metric] for r in self.rows
                         if r["method"] == method and (keep is None or r["dataset"] in keep)], dtype=float)

    def summary(self, method: str, metric: str, datasets: Iterable[str] | None = None) -> metrics.Summary | None:
        """Mean and 95% CI over images (NaNs, e.g. spot intensity of an image without spots, are
        left out); None when there is no value."""
        values = self.values(method, metric, datasets)
        values = values[np.isfinite(values)]
        return metrics.summarize(values) if values.size else None

    def scopes(self) -> list[tuple[str, list[str]]]:
        """(label, data set names): each data set, each group with several data sets, then all
        images when there are several data sets."""
        scopes = [(name, [name]) for name, _, _ in self.datasets]
        groups: dict[str, list[str]] = {}
        for name, group, _ in self.datasets:
            if group is not None:
                groups.setdefault(group, []).append(name)
        scopes += [(f"{group} (all)", names) for group, names in groups.items() if len(names) > 1]
        if len(self.datasets) > 1:
            scopes.append(("all images", [name for name, _, _ in self.datasets]))
        return scopes

    def top_scopes(self) -> list[tuple[str, list[str]]]:
        """The scopes of the summary tables: each group of several data sets, each data set
        outside such a group, and all images."""
        grouped = {name for label, names in self.scopes() if label.endswith(" (all)") for name in names}
        return [(label, names) for label, names in self.scopes() if not (len(names) == 1 and names[0] in grouped)]


def run_evaluation(datasets: Sequence[Dataset], methods: Sequence[Method], model=None,
                   progress: Callable[[int, int], None] | None = None, notes: Sequence[str] = (),
                   tile_size: int | None = DEFAULT_TILE_SIZE) -> Results:
    """Scores every method on every image; the image is enhanced once (by `model`, with
    `tile_size`) for all the methods that need it, and nothing but the per-image numbers is kept."""
    if not methods:
        raise ValueError("no methods to evaluate")
    if not datasets:
        raise ValueError("no data sets to evaluate")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"data set names must be unique, got {names}: name them with NAME=FOLDER")
    method_names = [m.name for m in methods]
    if len(set(method_names)) != len(method_names):
        raise ValueError(f"method names must be unique, got {method_names}")
    if model is None and any(m.needs_enhanced for m in methods):
        raise ValueError("a model is needed to evaluate methods on enhanced images")
    total = sum(len(d) for d in datasets)
    rows: list[dict] = []
    done = 0
    start = time.perf_counter()
    for dataset in datasets:
        for sample in dataset:
            enhanced, enhance_seconds = None, 0.0
            if any(m.needs_enhanced for m in methods):
                t = time.perf_counter()
                enhanced = model.enhance(sample.image, tile_size=tile_size)
                enhance_seconds = time.perf_counter() - t
            for method in methods:
                t = time.perf_counter()
                found = method.detect(sample, enhanced if method.needs_enhanced else None)
                seconds = time.perf_counter() - t + (enhance_seconds if method.needs_enhanced else 0.0)
                intensity = None if method.spot_image is None else method.spot_image(sample, enhanced)
                row = dict(dataset=dataset.name, image=sample.name, method=method.name)
                row.update(score_image(sample.truth, found, intensity))
                row["seconds"] = seconds
                rows.append(row)
            done += 1
            if progress is not None:
                progress(done, total)
    datasets_info = [(d.name, d.group, len(d)) for d in datasets]
    counted = {name: sum(1 for r in rows if r["dataset"] == name) // len(methods) for name in names}
    for name, _, expected in datasets_info:
        if counted[name] != expected:
            raise ValueError(f"data set {name} announced {expected} images but yielded {counted[name]}")
    return Results(rows, method_names, datasets_info, list(notes), time.perf_counter() - start,
                   {m.name: m.label for m in methods})


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _format(summary: metrics.Summary | None, metric: str) -> str:
    if summary is None:
        return "-"
    scale = 100.0 if metric in _PERCENT else 1.0
    digits = 2 if metric in _PERCENT or metric in ("ambiguous", "seconds") else 1
    if metric == "seconds":
        digits = 3
    mean = f"{summary.mean * scale:.{digits}f}"
    if summary.n < 2 or not math.isfinite(summary.half_width):
        return mean
    return f"{mean} ± {summary.half_width * scale:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def f1_table(results: Results) -> str:
    """F1 (%) with methods as rows and the top-level scopes (groups, data sets outside a group,
    all images) as columns: the paper's Table 4 layout."""
    scopes = results.top_scopes()
    header = ["method"] + [f"{label} ({len(results.values(results.methods[0], 'f1', names))} img)"
                           for label, names in scopes]
    return "\n".join(_table(header, [[m] + [_format(results.summary(m, "f1", names), "f1") for _, names in scopes]
                                     for m in results.methods]))


def markdown_report(results: Results, title: str = "DeepSpot evaluation", preamble: Sequence[str] = ()) -> str:
    scopes, top = results.scopes(), results.top_scopes()
    labels = [results.labels.get(m, m) for m in results.methods]
    lines = [f"# {title}", ""]
    lines += list(preamble)
    if preamble:
        lines.append("")
    n_images = sum(n for _, _, n in results.datasets)
    lines += [f"{len(results.datasets)} data set(s), {n_images} images, {len(results.methods)} method(s); "
              f"evaluation wall time {results.wall_seconds:.1f} s.", ""]
    lines += ["Values are the mean over images with the half-width of its 95% confidence interval "
              "(t-distribution). F1, precision, recall and AM/img (ambiguous matches per image) follow the paper: each "
              "annotated spot takes its nearest detection within 3 px. One-to-one F1: Hungarian matching at 3 px. "
              "F1 integral: the one-to-one F1 averaged over cutoffs 0..3 px (deepBlink's trapezoid rule). "
              "s/img: wall time per image, enhancement included.", ""]
    if results.notes:
        lines += [f"> {note}" for note in results.notes] + [""]
    lines += ["## F1 (%) per method (paper protocol; cf. the paper's Table 4)", "", f1_table(results), ""]
    lines += ["## All metrics per method (cf. the paper's Table 3)", ""]
    summary_metrics = ("f1", "precision", "recall", "ambiguous", "f1_one_to_one", "f1_integral", "seconds")
    for label, names in top:
        lines += [f"### {label}", ""]
        lines += _table(["method"] + [METRIC_TITLES[k] for k in summary_metrics],
                        [[m] + [_format(results.summary(m, k, names), k) for k in summary_metrics]
                         for m in results.methods])
        lines.append("")
    with_intensity = [m for m in results.methods if results.summary(m, "spot_intensity") is not None]
    if with_intensity:
        lines += ["## Spot intensity (0..255) at the annotated spots (cf. the paper's Table 2)", "",
                  "The method's image at each annotated pixel x 255, averaged over the image's spots: the enhanced "
                  "image for DeepSpot, the raw image divided by its maximum for the raw baseline.", ""]
        lines += _table(["method"] + [label for label, _ in top],
                        [[m] + [_format(results.summary(m, "spot_intensity", names), "spot_intensity")
                                for _, names in top] for m in with_intensity])
        lines.append("")
    if len(scopes) > len(top):
        lines += ["## F1 (%) per data set (cf. the paper's Figure 5)", ""]
        lines += _table(["data set", "images"] + labels,
                        [[label, str(len(results.values(results.methods[0], "f1", names)))]
                         + [_format(results.summary(m, "f1", names), "f1") for m in results.methods]
                         for label, names in scopes])
        lines.append("")
    lines += ["## Every metric per data set", ""]
    detail = ("f1", "precision", "recall", "ambiguous", "f1_one_to_one", "f1_integral", "spot_intensity")
    for m in results.methods:
        lines += [f"### {m}", ""]
        lines += _table(["data set"] + [METRIC_TITLES[k] for k in detail],
                        [[label] + [_format(results.summary(m, k, names), k) for k in detail]
                         for label, names in scopes])
        lines.append("")
    return "\n".join(lines)


SUMMARY_COLUMNS = ("method", "scope", "n_images") + tuple(
    f"{metric}_{part}" for metric in METRICS for part in ("mean", "ci_low", "ci_high"))
PER_IMAGE_COLUMNS = ("dataset", "image", "method", "n_annotated", "n_detected", "tp", "fp", "fn", "ambiguous", "f1",
                     "precision", "recall", "f1_one_to_one", "f1_integral", "spot_intensity", "seconds")


def _csv_value(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else f"{float(value):.6g}"
    return str(value)


def summary_rows(results: Results) -> list[dict]:
    rows = []
    for label, names in results.scopes():
        for m in results.methods:
            row = dict(method=m, scope=label, n_images=len(results.values(m, "f1", names)))
            for metric in METRICS:
                s = results.summary(m, metric, names)
                row[f"{metric}_mean"] = float("nan") if s is None else s.mean
                row[f"{metric}_ci_low"] = float("nan") if s is None else s.low
                row[f"{metric}_ci_high"] = float("nan") if s is None else s.high
            rows.append(row)
    return rows


def write_summary_csv(results: Results, path: Path) -> None:
    """The summaries (SUMMARY_COLUMNS: every metric's mean and 95 % CI per method and scope)."""
    _write_csv(path, SUMMARY_COLUMNS, summary_rows(results))


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row[c]) for c in columns])


def f1_matrix(results: Results) -> tuple[list[str], list[str], np.ndarray]:
    """(method labels, data set names, mean F1 [methods, data sets])."""
    names = [name for name, _, _ in results.datasets]
    matrix = np.array([[results.values(m, "f1", [d]).mean() for d in names] for m in results.methods])
    return results.methods, names, matrix


def write_heat_map(results: Results, path: Path) -> str:
    """F1 (%) per method x data set as a PNG: with matplotlib when installed, else Pillow.
    Returns the backend used."""
    methods, names, matrix = f1_matrix(results)
    row_labels = [results.labels.get(m, m) for m in methods]
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - any failure falls back to Pillow
        write_bytes(path, _heat_map_pillow(row_labels, names, matrix))
        return "pillow"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 3.0), 1.0 + 0.6 * len(methods)), dpi=120)
    image = ax.imshow(matrix * 100, cmap="viridis", vmin=max(0.0, float(np.nanmin(matrix)) * 100 - 5), vmax=100,
                      aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), row_labels, fontsize=9)
    for i in range(len(methods)):
        for j in range(len(names)):
            value = matrix[i, j] * 100
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="black" if value > (image.norm.vmin + 100) / 2 else "white")
    fig.colorbar(image, ax=ax, label="F1 (%)", fraction=0.03)
    ax.set_title("F1 (%) per method and data set (nearest detection within 3 px)", fontsize=10)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return "matplotlib"


_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def _heat_map_pillow(row_labels: Sequence[str], names: Sequence[str], matrix: np.ndarray) -> bytes:
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    cell_w, cell_h = 44, 26
    left = 12 + 7 * max(len(label) for label in row_labels)
    top, bottom = 30, 12 + 7 * max(len(n) for n in names)
    title = "F1 (%) per method and data set (nearest detection within 3 px)"
    width = max(left + cell_w * len(names) + 12, 12 + 7 * len(title))
    height = top + cell_h * len(row_labels) + bottom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 8), title, fill="black", font=font)
    low = max(0.0, float(np.nanmin(matrix)) - 0.05)
    for i, label in enumerate(row_labels):
        draw.text((6, top + i * cell_h + 8), label, fill="black", font=font)
        for j in range(len(names)):
            value = matrix[i, j]
            t = 0.0 if not np.isfinite(value) else float(np.clip((value - low) / max(1.0 - low, 1e-9), 0, 1))
            position = t * (len(_VIRIDIS) - 1)
            k = min(int(position), len(_VIRIDIS) - 2)
            colour = tuple(int(c) for c in _VIRIDIS[k] + (_VIRIDIS[k + 1] - _VIRIDIS[k]) * (position - k))
            x, y = left + j * cell_w, top + i * cell_h
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=colour)
            draw.text((x + 8, y + 8), f"{value * 100:.1f}", fill="black" if t > 0.5 else "white", font=font)
    for j, name in enumerate(names):  # column labels, rotated
        label = Image.new("RGBA", (7 * len(name) + 4, 12), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=font)
        rotated = label.rotate(90, expand=True)
        canvas.paste(rotated, (left + j * cell_w + cell_w // 2 - 6, top + cell_h * len(row_labels) + 6), rotated)
    buffer = _io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


REPORT_FILES = ("evaluation.md", "evaluation.csv", "evaluation_per_image.csv", "evaluation_f1.png")


def write_report(results: Results, out_dir: str | Path, title: str = "DeepSpot evaluation",
                 preamble: Sequence[str] = ()) -> dict[str, Path]:
    """Writes REPORT_FILES into out_dir (each atomically); returns them by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(("markdown", "summary_csv", "per_image_csv", "heat_map"), (out / f for f in REPORT_FILES)))
    write_summary_csv(results, paths["summary_csv"])
    _write_csv(paths["per_image_csv"], PER_IMAGE_COLUMNS, results.rows)
    write_heat_map(results, paths["heat_map"])
    text = markdown_report(results, title, preamble)
    text += f"\n![F1 per method and data set]({paths['heat_map'].name})\n"
    write_bytes(paths["markdown"], text.encode())
    return paths
