"""The `deepspot` command line: one entry point, subcommands that call the plain Python API
(Model.load / enhance / detect, simulate, metrics). Batches never overwrite silently, write
atomically, skip finished outputs with --resume, report unreadable files by name and go on,
and exit non-zero at the end if anything failed."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

EXAMPLES = """examples:
  deepspot demo                                  enhance + detect the bundled sample, print F1, write an overlay
  deepspot run images/ -o results/               enhance and detect every TIFF/PNG in images/
  deepspot enhance 'raw/*.tif' -o enhanced/      write <name>.enhanced.tif for each input
  deepspot detect enhanced/ -o spots/            find spots in images that are already enhanced
  deepspot run mosaic.zarr -o out/ --save-enhanced   a large image in 2048 px blocks: out/mosaic.enhanced.zarr
  deepspot run images/ -o out/ --scheduler tcp://head:8786   the files as tasks on a Dask cluster
  deepspot simulate sim/ -n 20 --recipe ds_var --spots 10 100
  deepspot train sim/ -o run1/ --epochs 10              fine-tune on images + CSVs; resumable with --resume
  deepspot evaluate sim/ --simulated -o report/   accuracy vs ground truth and baselines (Markdown, CSV, PNG)
  deepspot polarity wound=a.spots.csv,cells.tif,nuclei.tif -o pol/ --towards 0 512   RNA polarity toward a wound
  deepspot --version                             the version, the default weights, the devices that work here
"""

# Each subcommand's --help ends with these.
COMMAND_EXAMPLES = {
    "demo": ["deepspot demo                          the bundled sample, written to ./deepspot-demo/",
             "deepspot demo -o demo2/ --weights run1/best.safetensors   other weights, another folder",
             "deepspot demo --overwrite --device cpu   replace an earlier demo's files, on the CPU"],
    "enhance": ["deepspot enhance 'raw/*.tif' -o enhanced/     <name>.enhanced.tif for each input",
                "deepspot enhance raw/ -o enhanced/ --resume     skip the inputs already done",
                "deepspot enhance mosaic.zarr -o out/ --block-size 4096   a large image in 4096 px blocks"],
    "run": ["deepspot run images/ -o results/                 <name>.spots.csv for each input",
            "deepspot run images/ -o results/ --overlay       also <name>.overlay.png and report.md",
            "deepspot run images/ -o results/ --threshold 0.6 --save-enhanced   more spots, keep the enhanced images",
            "deepspot run images/ -o results/ --scheduler local:4   four worker processes here"],
    "detect": ["deepspot detect enhanced/ -o spots/               spots of images enhanced earlier",
               "deepspot detect enhanced/ -o spots/ --method wavelet --subpixel gaussian --overlay"],
    "simulate": ["deepspot simulate sim/ -n 20 --recipe ds_var --spots 10 100",
                 "deepspot simulate real/ -n 100 --recipe realistic --background cells.tif"],
    "evaluate": ["deepspot evaluate --simulated -o report/          the paper's test sets",
                 "deepspot evaluate mine=annotated/ -o report/ --no-bigfish   your annotated images",
                 "deepspot evaluate --finetune \"mine=img.tif,spots.csv\" -o ft/   fine-tune on one half, score the other"],
    "polarity": ["deepspot polarity a.spots.csv,a_cells.tif,a_nuclei.tif -o pol/ --angle 90   wound above every cell",
                 "deepspot polarity migrating=a.tif,a_cells.tif,a_nuclei.tif,a_wound.csv "
                 "control=b.tif,b_cells.tif,b_nuclei.tif,b_wound.csv -o pol/   two groups; spots detected first",
                 "deepspot polarity a.spots.csv,a_cells.tif,a_nuclei.tif -o pol/ --towards 0 400 --rotate"],
    "train": ["deepspot train sim/ -o run1/                      fine-tune on images + CSVs",
              "deepspot train sim/ -o run1/ --resume             continue an interrupted run (the same command)",
              "deepspot train mine=annotated/ -o run2/ --epochs 30 --learning-rate 5e-5"],
}
MODEL_DETECTION_DEFAULT = "default: the model's own, see docs/detection_defaults.md"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions but keeps the line breaks of the examples (text with line breaks); adds
    "(default: X)" to a flag's help unless it names its default."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, argparse.SUPPRESS) \
                or action.default is False:
            return text
        return f"{text} (default: %(default)s)"


def version_text() -> str:
    """The package version, the weights used without --weights, and where the network can run here."""
    from . import __version__
    from .devices import available_devices, probe
    from .model import DEFAULT_MODEL, weights_path
    lines = [f"deepspot {__version__} ({Path(__file__).parent})",
             f"default weights: {weights_path(None)} ({DEFAULT_MODEL})"]
    lines += [f"device {name}: {description}" for name, description in available_devices()]
    works, reason = probe("cuda")
    if not works:
        lines.append(f"device cuda: not available ({reason})")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """--version: worked out only when asked for (probing the GPU takes a moment)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version, the default weights file and the devices that work here, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


class Progress:
    """A one-line progress bar on stderr (a plain line per update when stderr is not a terminal);
    `unit` names what it counts."""

    line_open = False  # a bar's line on the terminal still waits for its newline

    def __init__(self, label: str, quiet: bool = False, unit: str = ""):
        self.label, self.quiet, self.unit, self.start = label, quiet, unit, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or (not self.tty and done != total):
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        count = f"{done}/{total}" + (f" {self.unit}" if self.unit else "")
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {count} {elapsed:5.1f}s"
        print(("\r" if self.tty else "") + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        Progress.line_open = self.tty and done != total

    @staticmethod
    def end_line() -> None:
        """Ends an unfinished bar's line, so that the next message starts a line of its own."""
        if Progress.line_open:
            print(file=sys.stderr, flush=True)
            Progress.line_open = False


@dataclass
class BatchRow:
    name: str
    status: str  # done, skipped or FAILED
    detail: str
    targets: dict[str, Path] = field(default_factory=dict)
    seconds: float | None = None  # None where it was not timed here (skipped, failed, on a cluster)


@dataclass
class BatchReport:
    rows: list[BatchRow] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row.status == status)

    @property
    def failed(self) -> int:
        return self.count("FAILED")

    def print(self) -> None:
        if not self.rows:
            return
        width = max(len(row.name) for row in self.rows)
        print(f"\n{'file':<{width}}  {'status':<8}  detail")
        for row in self.rows:
            print(f"{row.name:<{width}}  {row.status:<8}  {row.detail}")
        print(f"\n{self.count('done')} done, {self.count('skipped')} skipped, {self.failed} failed")

    def markdown(self, title: str) -> str:
        """report.md: every image with its spot count, time and overlay (links relative to the output folder)."""
        lines = [f"# {title}", "", "| image | status | spots | seconds | overlay |", "|---|---|---:|---:|---|"]
        for row in self.rows:
            spots, overlay = row.targets.get("spots"), row.targets.get("overlay")
            count = _table_rows(spots) if spots is not None and spots.is_file() and row.status != "FAILED" else ""
            seconds = "" if row.seconds is None else f"{row.seconds:.3f}"
            link = f"[{overlay.name}]({overlay.name})" if overlay is not None and overlay.is_file() else ""
            status = row.status if row.status != "FAILED" else f"FAILED: {row.detail}"
            lines.append(f"| {row.name} | {status} | {count} | {seconds} | {link} |")
        return "\n".join(lines + [""])


def _table_rows(path: Path) -> int:
    with open(path) as f:
        return sum(1 for _ in f) - 1  # the header


def _load_model(args):
    """The model of --weights on --device with --precision; says on stderr where it runs (unless -q)."""
    from .devices import gpu_not_trusted, probe
    from .model import Model
    model = Model.load(args.weights, device=args.device, precision=args.precision)
    if not args.quiet:
        print(f"deepspot: device: {model.device} ({probe(model.device)[1]}), {model.precision}", file=sys.stderr)
    untrusted = gpu_not_trusted() if model.device == "cpu" and args.device == "auto" else None
    if untrusted:
        print(f"deepspot: warning: a GPU is present but not used: {untrusted}", file=sys.stderr)
    return model


BATCH_REPORT = "report.md"  # with --overlay


def _run_batch(args, outputs: Callable[[Path], dict[str, Path]], work: Callable[[Path, dict[str, Path], Progress], str],
               parallel: Callable[[list[tuple[Path, dict[str, Path]]]], Iterator[tuple[int, str, str]]] | None = None
               ) -> int:
    """Checks every input's outputs (--resume, --overwrite), then runs `work` on each input here,
    or hands them all to `parallel` (a cluster), which yields (index, status, detail) as they finish.
    Failures are reported once, in the table printed at the end."""
    from .io import find_images
    files = find_images(args.inputs)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file name; their outputs would collide: process them separately")
    overlay = getattr(args, "overlay", False)
    report_path = out_dir / BATCH_REPORT
    if overlay and report_path.exists() and not (args.overwrite or args.resume):
        raise ValueError(f"{report_path} exists: pass --overwrite or --resume")
    report = BatchReport()
    pending: list[tuple[int, Path, dict[str, Path]]] = []
    for index, path in enumerate(files, 1):
        targets = outputs(path)
        existing = [t for t in targets.values() if t.exists()]
        if existing and args.resume and len(existing) == len(targets):
            report.rows.append(BatchRow(path.name, "skipped", "outputs exist (--resume)", targets))
            continue
        if existing and not (args.overwrite or args.resume):
            report.rows.append(BatchRow(path.name, "FAILED", f"{existing[0].name} exists: pass --overwrite or --resume"))
            continue
        if parallel is not None:
            report.rows.append(BatchRow(path.name, "FAILED", "not run", targets))
            pending.append((len(report.rows) - 1, path, targets))
            continue
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # each image's warnings, even where the last image had the same
                detail = work(path, targets, Progress(f"[{index}/{len(files)}] {path.name}", args.quiet))
            report.rows.append(BatchRow(path.name, "done", detail, targets, time.perf_counter() - start))
        except (ValueError, TypeError, OSError, MemoryError) as exc:
            report.rows.append(BatchRow(path.name, "FAILED", str(exc), targets))
        Progress.end_line()
        for warning in caught:
            print(f"deepspot {args.command}: warning: {path.name}: {warning.message}", file=sys.stderr)
    if pending:
        for index, status, detail in parallel([(path, targets) for _, path, targets in pending]):
            row, path, targets = pending[index]
            report.rows[row] = BatchRow(path.name, status, detail, targets)
    report.print()  # every failure once, here at the end, where a long batch's reader looks
    if overlay:
        from .io import write_bytes
        write_bytes(report_path, report.markdown(f"deepspot {args.command}: {len(files)} image{'s' if len(files) != 1 else ''}").encode())
        print(f"wrote {report_path}")
    return 1 if report.failed else 0


def _file_job(args, path: Path, targets: dict[str, Path], enhance: bool, detect: bool):
    from .large import FileJob
    from .model import weights_path
    weights = getattr(args, "weights", None)
    return FileJob(path=str(Path(path).resolve()), targets={k: str(Path(v).resolve()) for k, v in targets.items()},
                   enhance=enhance, detect=detect, tile_size=getattr(args, "tile_size", 512),
                   detection=_detection_overrides(args) if detect else {}, block_size=args.block_size,
                   overwrite=bool(args.overwrite or args.resume),
                   weights=str(weights_path(weights).resolve()) if weights else None, device=getattr(args, "device", "auto"),
                   precision=getattr(args, "precision", "float32"))


def _process_batch(args, outputs, enhance: bool, detect: bool) -> int:
    """Runs the enhance/run/detect batch here (one model, the C core on every core) or, with
    --scheduler, on a Dask cluster (files and blocks of large images as tasks)."""
    from .large import process_file
    from .model import weights_path
    if args.block_size is not None:
        from .large import check_block_size
        check_block_size(args.block_size)
    if args.scheduler is None:
        model = _load_model(args) if enhance else None

        def work(path, targets, progress):
            return process_file(_file_job(args, path, targets, enhance, detect), model, progress)

        return _run_batch(args, outputs, work)

    weights = getattr(args, "weights", None)
    if weights is not None and not weights_path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    from .distributed import connect, run_jobs

    def parallel(items):
        jobs = [_file_job(args, path, targets, enhance, detect) for path, targets in items]
        with connect(args.scheduler) as client:
            if not args.quiet:
                workers = len(client.scheduler_info().get("workers", {}))
                print(f"deepspot: {len(jobs)} input(s) on the Dask cluster at {client.scheduler.address} "
                      f"({workers} workers)", file=sys.stderr)
            yield from run_jobs(client, jobs, progress=Progress("files", args.quiet),
                                block_progress=lambda job: Progress(Path(job.path).name, args.quiet))

    return _run_batch(args, outputs, None, parallel=parallel)


def _enhanced_target(args, path: Path) -> Path:
    from .large import enhanced_suffix
    return Path(args.output) / f"{path.stem}.enhanced{enhanced_suffix(path, args.output_format)}"


def cmd_enhance(args) -> int:
    return _process_batch(args, lambda p: {"enhanced": _enhanced_target(args, p)}, enhance=True, detect=False)


def _detection_overrides(args) -> dict:
    names = ("method", "threshold", "min_distance", "subpixel")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_detect(args, enhance_first: bool = False) -> int:
    from .large import blocked_size

    def outputs(path):
        out = {"spots": Path(args.output) / f"{path.stem}.spots.csv"}
        if enhance_first and args.save_enhanced:
            out["enhanced"] = _enhanced_target(args, path)
        if args.overlay and blocked_size(path, args.block_size) is None:  # images processed in blocks are too large
            out["overlay"] = Path(args.output) / f"{path.stem}.overlay.png"
        return out

    return _process_batch(args, outputs, enhance=enhance_first, detect=True)


def cmd_simulate(args) -> int:
    from .io import read_image
    from .simulate import simulate_dataset
    spots = None if args.spots is None else tuple(args.spots) if len(args.spots) == 2 else args.spots[0]
    if args.recipe != "realistic":
        if args.background or args.kinds or args.snr:
            raise ValueError("--background, --kinds and --snr belong to --recipe realistic")
        paths = simulate_dataset(args.output, args.n, recipe=args.recipe, n_spots=(10, 100) if spots is None else spots,
                                 seed=args.seed, size=args.size)
        print(f"wrote {len(paths)} images with targets and ground truth to {args.output}")
        return 0
    from .realistic import SNR_RANGE, background_sources, realistic_dataset
    images = [np.asarray(read_image(path)) for path in args.background or ()]
    for path, pixels in zip(args.background or (), images):
        if pixels.ndim != 2:
            raise ValueError(f"{path}: a background must be a 2D greyscale image, this one has shape {pixels.shape}")
    sources = background_sources(images, None if args.background_part == "all" else args.background_part)
    paths = realistic_dataset(args.output, args.n, seed=args.seed, size=args.size, sources=sources, kinds=args.kinds,
                              n_spots=spots, snr=tuple(args.snr) if args.snr else SNR_RANGE)
    print(f"wrote {len(paths)} realistic images with ground truth to {args.output}"
          + (f" ({len(sources)} real background sources)" if sources else ""))
    return 0


DEMO_FILES = ("sample.enhanced.tif", "sample.spots.csv", "sample.overlay.png")


def cmd_demo(args) -> int:
    from . import metrics
    from .data import sample_image_path, sample_spots_path
    from .io import read_image, write_spots_table, write_tiff
    from .overlay import draw_overlay
    from .simulate import read_spots_csv
    out = _output_folder(args, DEMO_FILES)
    out.mkdir(parents=True, exist_ok=True)
    image, truth = read_image(sample_image_path()), read_spots_csv(sample_spots_path())
    model = _load_model(args)
    print(f"model: {model.path.name} ({model.num_parameters:,} parameters, {model.device}, {model.precision})")
    print(f"image: {sample_image_path().name} {image.shape} {image.dtype}, {len(truth)} annotated spots")
    start = time.perf_counter()
    enhanced = model.enhance(image, progress=Progress("enhance", args.quiet))
    spots = model.detect(image, enhanced=enhanced)
    seconds = time.perf_counter() - start
    paper = metrics.match_nearest(truth, spots.coords)
    hungarian = metrics.match_hungarian(truth, spots.coords)
    enhanced_path, spots_path, overlay_path = (out / name for name in DEMO_FILES)
    write_tiff(enhanced_path, enhanced)
    write_spots_table(spots_path, spots.as_table())
    draw_overlay(image, spots.coords, overlay_path, truth=truth)
    print(f"found {len(spots)} spots in {seconds:.2f} s")
    print(f"F1 {paper.f1:.3f} (precision {paper.precision:.3f}, recall {paper.recall:.3f}; nearest detection within "
          f"3 px, {paper.ambiguous} ambiguous) | one-to-one F1 {hungarian.f1:.3f}")
    print("  ambiguous: an annotation whose nearest detection is already another annotation's (two spots found "
          "as one); counted against recall, the paper's way\n  one-to-one F1: each detection matches at most one "
          "annotation (Hungarian matching, within 3 px)")
    print(f"wrote {enhanced_path}, {spots_path}, {overlay_path}")
    return 0


def cmd_evaluate(args) -> int:
    import dataclasses
    from . import evaluate
    datasets = [evaluate.parse_dataset_spec(spec) for spec in args.datasets]
    if args.finetune:
        return _evaluate_finetune(args, datasets)
    if args.realistic:
        return _evaluate_realistic(args)
    if args.simulated:
        args.n_images = args.n_images or evaluate.PAPER_TEST_IMAGES
        if args.seed == evaluate.VALIDATION_SEED:
            print(f"deepspot evaluate: warning: seed {args.seed} gives the validation images the detection defaults "
                  "were chosen on; the test sets use seed 0", file=sys.stderr)
        datasets += evaluate.simulated_datasets(seed=args.seed, n_images=args.n_images, size=args.size, names=args.sets)
    if not datasets:
        raise ValueError("nothing to evaluate: give data set folders and/or --simulated")
    out = _output_folder(args, evaluate.REPORT_FILES)
    model = _load_model(args)
    params = dataclasses.replace(model.detection, **_detection_overrides(args))
    from .model import bundled_weights_path
    default = model.path.resolve() == bundled_weights_path().resolve()
    methods, notes = evaluate.default_methods(params, raw=not args.no_raw, bigfish=not args.no_bigfish,
                                              weights_name=None if default else model.path.name,
                                              bigfish_spot_radius_px=_bigfish_radius(args))
    for note in notes:
        print(f"deepspot evaluate: {note}", file=sys.stderr)
    results = evaluate.run_evaluation(datasets, methods, model, progress=Progress("evaluate", args.quiet), notes=notes,
                                      tile_size=args.tile_size)
    preamble = [f"Model: `{model.path.name}` ({model.num_parameters:,} parameters, {model.device}, "
                f"{model.precision}). Detection on "
                f"enhanced images: `{params}`."]
    if args.simulated:
        preamble.append(f"Simulated test sets: simulate.paper_test_sets(seed={args.seed}), {args.n_images} images of "
                        f"{args.size}x{args.size} per set.")
    paths = evaluate.write_report(results, out, preamble=preamble)
    print(evaluate.f1_table(results))
    print(f"\n{sum(n for _, _, n in results.datasets)} images in {results.wall_seconds:.1f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _bigfish_radius(args) -> float:
    from .evaluate import BIGFISH_SPOT_RADIUS_PX
    return BIGFISH_SPOT_RADIUS_PX if args.bigfish_spot_radius is None else args.bigfish_spot_radius


REALISTIC_REPORT = "realistic.md"
NO_SPOTS_CSV = "evaluation_no_spots.csv"  # the summaries of the images without spots (false detections)


def _evaluate_realistic(args) -> int:
    """The realistic benchmark (realistic_eval): the model of --weights and those of --compare with the
    fixed detector, Big-FISH and U-FISH, on the realistic test family and on images without spots."""
    import dataclasses
    from . import evaluate, realistic_eval
    from .model import Model
    out = _output_folder(args, evaluate.REPORT_FILES + (REALISTIC_REPORT, NO_SPOTS_CSV))
    n_images = args.n_images or realistic_eval.TEST_IMAGES
    sources, why = realistic_eval.real_background_sources(
        args.realdata if args.realdata is not None else realistic_eval.default_realdata(), "test")
    notes = [why] if why else [f"real backgrounds: the bottom-right quarters of {', '.join(realistic_eval.REAL_BACKGROUND_FILES)}"]
    overrides = _detection_overrides(args)
    models = [_load_model(args)]
    for weights in args.compare or ():
        model = Model.load(weights, device=args.device, precision=args.precision)
        if all(model.path.resolve() != m.path.resolve() for m in models):  # each model once
            models.append(model)
    # each model with its own detection defaults (Model.detection), the same overrides for all
    detections = [dataclasses.replace(m.detection, **overrides) for m in models]
    methods = [realistic_eval.model_method(m, f"DeepSpot {m.path.stem} + fixed detector", m.path.stem.replace("deepspot_", ""),
                                           d) for m, d in zip(models, detections)]
    params = ", ".join(f"{m.path.stem}: `{d}`" for m, d in zip(models, detections))
    if not args.no_bigfish:
        rows, bigfish_notes = evaluate.bigfish_rows(_bigfish_radius(args))
        methods += rows
        notes += bigfish_notes
    peers, peer_notes = realistic_eval.peer_methods(args.peers if args.peers is not None else realistic_eval.default_peers())
    methods += peers
    notes += peer_notes
    for note in notes:
        print(f"deepspot evaluate: {note}", file=sys.stderr)
    spots = evaluate.run_evaluation(realistic_eval.realistic_datasets(sources, args.seed, n_images, args.size), methods,
                                    progress=Progress("evaluate", args.quiet), notes=notes)
    empty = evaluate.run_evaluation(realistic_eval.empty_datasets(sources, args.seed, n_images, args.size), methods,
                                    progress=Progress("evaluate", args.quiet))
    preamble = [f"Realistic test family (deepspot_napari/realistic_eval.py), seed {args.seed}, {n_images} images of "
                f"{args.size}x{args.size} per set. Detection on enhanced images: {params}."]
    evaluate.write_report(spots, out, title="DeepSpot on realistic images", preamble=preamble)
    text = ["# Realistic benchmark: F1 per SNR bin, false detections without spots", "", *preamble, "",
            *[f"> {note}" for note in notes], "", "## F1 (%) per SNR bin (20-80 spots per image, every spot at that SNR)",
            "", *realistic_eval.snr_table(spots), "", "## Recall (%) per SNR bin", "",
            *realistic_eval.snr_table(spots, "recall"), "", "## F1 (%) per density (SNR 3-20)", "",
            evaluate.f1_table(spots), "", "## Images without spots", "", *realistic_eval.false_detections_table(empty),
            "", f"Every metric: [evaluation.md](evaluation.md). Wall time {spots.wall_seconds + empty.wall_seconds:.0f} s.", ""]
    from .io import write_bytes
    evaluate.write_summary_csv(empty, out / NO_SPOTS_CSV)
    write_bytes(out / REALISTIC_REPORT, "\n".join(text).encode())
    print("\n".join(realistic_eval.snr_table(spots)))
    print("\n".join(realistic_eval.false_detections_table(empty)))
    print(f"wrote {out / REALISTIC_REPORT} and {out / evaluate.REPORT_FILES[0]}")
    return 0


def _output_folder(args, report_files) -> Path:
    """--output, refused when it holds one of the files the command writes and --overwrite is not given."""
    out = Path(args.output)
    existing = [out / name for name in report_files if (out / name).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another folder (-o)")
    return out


def _evaluate_finetune(args, datasets) -> int:
    from . import evaluate
    from . import finetune_protocol as protocol
    from .io import write_bytes
    from .model import DEFAULT_MODEL
    if args.seeds < 1 or (args.epochs is not None and args.epochs < 1):
        raise ValueError("--seeds and --epochs must be at least 1")
    # the report names an image by its data set, and by its file too where the set has several
    samples = [evaluate.Sample(dataset.name if dataset.count == 1 else f"{dataset.name}/{sample.name}", sample.image,
                               sample.truth) for dataset in datasets for sample in dataset]
    if not samples:
        raise ValueError("--finetune needs annotated images: give data set folders ([NAME=]FOLDER[,CSV_FOLDER])")
    out = _output_folder(args, protocol.REPORT_FILES)
    out.mkdir(parents=True, exist_ok=True)
    weights = Path(args.weights) if args.weights else None
    device = _load_model(args).device
    runs = protocol.run_protocol(samples, weights, seeds=range(args.seeds), device=device,
                                 bigfish=not args.no_bigfish, **({} if args.epochs is None else {"epochs": args.epochs}),
                                 log=(lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr)))
    start = weights.name if weights is not None else f"the bundled weights ({DEFAULT_MODEL})"
    settings = "its defaults" if args.epochs is None else f"its defaults but at most {args.epochs} epochs"
    text = protocol.markdown(runs, [f"Starting weights: `{start}`; device {device}; Model.fit with {settings}; "
                                    f"seeds 0..{args.seeds - 1}. Made by `deepspot evaluate --finetune`."])
    write_bytes(out / "finetune.md", text.encode())
    rows = protocol.csv_rows(runs)
    evaluate._write_csv(out / "finetune.csv", list(rows[0]), rows)
    try:
        protocol.curves_png(runs, out / "finetune_curves.png")
    except ImportError:
        print("deepspot evaluate: finetune_curves.png skipped: matplotlib is not installed", file=sys.stderr)
    print(text)
    return 0


def cmd_train(args) -> int:
    from . import evaluate
    from .simulate import simulate_image
    from .train import ResumeMismatch, save_training_curves

    def read(specs):
        images, points = [], []
        for spec in specs:
            for sample in evaluate.parse_dataset_spec(spec):
                images.append(sample.image)
                points.append(sample.truth)
        return images, points

    images, points = read(args.data)
    validation = read(args.validation) if args.validation else None
    if not images:
        if not args.simulate:
            raise ValueError("nothing to train on: give folders of images + CSVs and/or --simulate N")
        rng = np.random.default_rng(args.seed)
        for _ in range(args.simulate):
            image, spots = simulate_image(rng, "hybrid", size=args.patch_size)
            images.append(image)
            points.append(spots)
    out = Path(args.output)
    if (out / "state.json").exists() and not args.resume:
        raise ValueError(f"{out} holds a training run: pass --resume to continue it, or choose another folder")
    model = _load_model(args)
    print(f"training {'from scratch' if args.from_scratch else 'from ' + model.path.name} on {len(images)} images"
          f"{f' + {args.simulate} simulated per epoch' if args.simulate else ''}; checkpoints in {out}")
    bar = Progress("train", args.quiet, unit="steps")

    def progress(done, total):
        bar.label = f"train epoch {-(-done * args.epochs // total)}/{args.epochs}"  # total: steps of all epochs
        bar(done, total)

    def print_epoch(record):
        Progress.end_line()
        print(f"{record['epoch']:>5}  {record['loss']:9.5f}  {record['val_loss']:9.5f}  {record['val_f1']:7.3f}  "
              f"{record['seconds']:7.1f}", flush=True)

    print(f"{'epoch':>5}  {'loss':>9}  {'val loss':>9}  {'val F1':>7}  {'seconds':>7}", flush=True)
    with warnings.catch_warnings():
        # incomplete-annotation warnings as the CLI's other messages, as soon as they are found
        warnings.showwarning = lambda message, *_, **__: print(f"deepspot train: warning: {message}", file=sys.stderr)
        try:
            history = model.fit(images, points, epochs=args.epochs, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, validation_split=args.validation_split,
                                seed=args.seed, max_term=args.max_term, checkpoint_dir=out, resume=args.resume,
                                patience=args.patience, monitor=args.monitor, augment=not args.no_augment,
                                batch_norm=args.batch_norm, simulate=args.simulate, validation=validation,
                                target_background=args.target_background, patch_size=args.patch_size,
                                from_scratch=args.from_scratch, bn_bessel=args.bn_bessel, progress=progress,
                                check_annotations=not args.no_annotation_check, on_epoch=print_epoch)
        except ResumeMismatch as exc:
            raise ValueError(f"cannot --resume the run in {out}: it was made with other settings or data "
                             f"({exc.differences}); give the same ones as then, or write to another folder "
                             "(-o)") from None
        except KeyboardInterrupt:
            Progress.end_line()
            command = args.argv + ([] if "--resume" in args.argv else ["--resume"])
            print(f"deepspot train: interrupted; {out} keeps the last complete epoch. Continue with:\n"
                  f"  deepspot {shlex.join(command)}", file=sys.stderr)
            return 130
    save_training_curves(history, out / "curves.png")
    print(f"\nbest epoch {history.best_epoch}{' (stopped early)' if history.stopped_early else ''}; "
          f"weights: {out / 'best.safetensors'} (deepspot run ... --weights {out / 'best.safetensors'})")
    return 0


@dataclass
class PolarityField:
    group: str
    spots: Path
    cells: Path
    nuclei: Path
    wound: Path | None


def _polarity_field(text: str) -> PolarityField:
    """[GROUP=]SPOTS,CELLS,NUCLEI[,WOUND]"""
    group, _, rest = text.partition("=") if "=" in text.split(",")[0] else ("", "", text)
    parts = rest.split(",")
    if len(parts) not in (3, 4) or not all(parts):
        raise argparse.ArgumentTypeError(f"expected [GROUP=]SPOTS,CELLS,NUCLEI[,WOUND], got {text!r}")
    return PolarityField(group or "all", *map(Path, parts[:3]), Path(parts[3]) if len(parts) == 4 else None)


def cmd_polarity(args) -> int:
    from .io import IMAGE_SUFFIXES, read_image
    from .polarity import RESULT_FILES, group_polarity, measure_cells, write_results
    from .simulate import read_spots_csv
    out = Path(args.output)
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{out} already holds {', '.join(existing)}; use --overwrite to replace them")
    direction = dict(angle=args.angle, towards=args.towards, wound=read_spots_csv(args.wound) if args.wound else None)
    if all(v is None for v in direction.values()) and any(spec.wound is None for spec in args.fields):
        raise ValueError("give the wound's direction: --angle, --towards, --wound, or a WOUND CSV in every field")
    model, failed = None, 0
    groups: dict[str, list] = {}
    for spec in args.fields:
        name = spec.spots.stem
        try:
            cells, nuclei = np.asarray(read_image(spec.cells)), np.asarray(read_image(spec.nuclei))
            if spec.spots.suffix.lower() in IMAGE_SUFFIXES:
                image = np.asarray(read_image(spec.spots))
                if image.shape != cells.shape or image.shape != nuclei.shape:
                    raise ValueError(f"the image is {image.shape} but the cell mask {cells.shape} and the nucleus "
                                     f"mask {nuclei.shape}: masks must have the image's shape")
                model = model or _load_model(args)
                spots = model.detect(image).coords
            else:
                spots = read_spots_csv(spec.spots)
            where = dict(angle=None, towards=None, wound=read_spots_csv(spec.wound)) if spec.wound else direction
            table = measure_cells(spots, cells, nuclei, sections=args.sections, rotate=args.rotate,
                                  compartments=args.compartments, **where)
        except (OSError, ValueError) as exc:
            print(f"deepspot polarity: {spec.spots}: {exc}", file=sys.stderr)
            failed += 1
            continue
        for message in table.messages:
            print(f"deepspot polarity: {spec.spots}: {message}", file=sys.stderr)
        groups.setdefault(spec.group, []).append((name, table))
    results = []
    for group, fields in groups.items():
        try:
            results.append(group_polarity(group, [t for _, t in fields], bootstrap=args.bootstrap,
                                          sample_size=args.sample_size, seed=args.seed))
        except ValueError as exc:
            print(f"deepspot polarity: {exc}", file=sys.stderr)
            failed += 1
    if not groups:
        raise ValueError("no field could be measured")
    written = write_results(out, groups, results)
    print("group       cells  polarity index  error  95% interval (cells)  p-value")
    for r in results:
        low, high = r.polarity.interval
        print(f"{r.name:<10} {r.polarity.n_cells:6d}  {r.polarity.index:14.3f}  {r.polarity.error:5.3f}  "
              f"{low:9.3f} .. {high:6.3f}  {r.polarity.pvalue:.3g}")
    print(f"wrote {', '.join(map(str, written))}")
    return 1 if failed else 0


def _target_background(text: str):
    if text in ("model", "paper"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected model, paper or a number in (0, 1], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .devices import DEVICES, PRECISIONS
    from .model import BUNDLED_MODELS, DEFAULT_MODEL, DEFAULT_TILE_SIZE
    from .train import DEFAULT_EPOCHS, DEFAULT_PATCH_SIZE, DEFAULT_PATIENCE
    parser = argparse.ArgumentParser(
        prog="deepspot", formatter_class=HelpFormatter, epilog=EXAMPLES,
        description="DeepSpot: enhance every RNA spot of smFISH images to the same intensity with a CNN, then find "
                    "them all with one fixed detector setting.")
    parser.add_argument("--version", action=VersionAction)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, **kwargs):
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in COMMAND_EXAMPLES[name])
        return subparsers.add_parser(name, formatter_class=HelpFormatter, epilog=epilog, **kwargs)

    def common(p, model=True):
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if model:
            p.add_argument("--weights", help="a .safetensors model, or a bundled model's name: "
                                             f"{', '.join(BUNDLED_MODELS)} (default: {DEFAULT_MODEL})")
            p.add_argument("--device", default="auto", choices=DEVICES,
                           help="where the network runs (default: auto = the GPU when one works here, else the CPU)")
            p.add_argument("--precision", default="float32", choices=PRECISIONS,
                           help="the convolutions' arithmetic: float32 (default), tf32 (TF32 tensor cores, "
                                "10-bit mantissa; GPU only), bf16 (bf16 convolutions with float32 accumulation, "
                                "about 1.8x faster; CPUs with bf16 instructions only, docs/benchmarks.md) or auto "
                                "(bf16 where it runs, else float32)")
            p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE,
                           help="window side in pixels for large planes; results equal a whole-image pass")

    def batch(p, enhanced_output=True):
        from .large import DEFAULT_BLOCK_SIZE, HALO_PX, LARGE_IMAGE_PIXELS
        p.add_argument("inputs", nargs="+",
                       help="image files (TIFF, OME-TIFF, PNG, Zarr/OME-Zarr), folders or glob patterns")
        p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="skip inputs whose outputs already exist")
        mode.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        group = p.add_argument_group("large images and clusters")
        group.add_argument("--block-size", type=int, metavar="PX",
                           help=f"process every input in blocks of PX x PX pixels (a multiple of 8) with a {HALO_PX} px "
                                f"halo; results equal a whole-image pass while memory stays bounded (default: "
                                f"{DEFAULT_BLOCK_SIZE} px blocks for Zarr inputs and images over "
                                f"{LARGE_IMAGE_PIXELS / 2**20:g} Mpx, the others whole)")
        group.add_argument("--scheduler", metavar="ADDRESS",
                           help="run on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://10.0.0.5:8786; "
                                "files and blocks of large images are the tasks; workers need the same paths), or "
                                "'local[:N]' for a cluster of N single-threaded worker processes here")
        if enhanced_output:
            group.add_argument("--output-format", choices=("auto", "tiff", "zarr"), default="auto",
                               help="enhanced images as TIFF or OME-Zarr (default auto: Zarr for Zarr inputs and "
                                    "large images, TIFF otherwise)")

    def detection(p):
        """The detector's flags; their defaults are the model's own (Model.detection)."""

        group = p.add_argument_group("detection (one fixed setting, chosen on validation data)")
        group.add_argument("--method", choices=("peak", "wavelet"),
                           help=f"peak: local maxima of the enhanced image; wavelet: the wavelet detector "
                                f"({MODEL_DETECTION_DEFAULT})")
        group.add_argument("--threshold", type=float,
                           help=f"peak detector: minimum enhanced value, 0..1 ({MODEL_DETECTION_DEFAULT})")
        group.add_argument("--min-distance", type=float,
                           help=f"peak detector: minimum distance between spots in px ({MODEL_DETECTION_DEFAULT})")
        group.add_argument("--subpixel", choices=("none", "centroid", "gaussian"),
                           help=f"subpixel refinement of the positions ({MODEL_DETECTION_DEFAULT})")

    def overlay(p):
        p.add_argument("--overlay", action="store_true",
                       help="also write <name>.overlay.png (the image, or a stack's maximum projection, with the spots "
                            f"marked and counted) and {BATCH_REPORT}, which lists every image with its spot count, time "
                            "and overlay (images processed in blocks get no overlay)")

    p = command("demo", help="enhance and detect the bundled sample image; print F1 against its ground truth",
                       description="Runs the whole pipeline on the bundled simulated sample with the bundled weights: "
                                   "prints the spot count and F1, writes the enhanced image, the spots CSV and an "
                                   "overlay PNG (green circles: ground truth, red crosses: detections).")
    common(p)
    p.add_argument("-o", "--output", default="deepspot-demo", help="output folder (default: ./deepspot-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in the output folder")
    p.set_defaults(func=cmd_demo)

    p = command("enhance", help="enhance images (writes <name>.enhanced.tif, or .zarr for Zarr/large inputs)")
    common(p)
    batch(p)
    p.set_defaults(func=cmd_enhance)

    p = command("run", help="enhance and detect (writes <name>.spots.csv, optionally the enhanced image)")
    common(p)
    batch(p)
    detection(p)
    overlay(p)
    p.add_argument("--save-enhanced", action="store_true",
                   help="also write <name>.enhanced.tif (or .zarr, see --output-format)")
    p.set_defaults(func=lambda a: cmd_detect(a, enhance_first=True))

    p = command("detect", help="detect spots in images that are already enhanced (writes <name>.spots.csv)")
    common(p, model=False)
    p.add_argument("--weights", help="the model that enhanced the images, whose detection defaults are used: a "
                                     f".safetensors file or a bundled model's name (default: {DEFAULT_MODEL})")
    batch(p, enhanced_output=False)
    detection(p)
    overlay(p)
    p.set_defaults(func=cmd_detect)

    p = command("simulate", help="simulate smFISH images with targets and ground-truth CSVs")
    common(p, model=False)
    p.add_argument("output", help="output folder")
    p.add_argument("-n", type=int, default=10, help="number of images (default 10)")
    p.add_argument("--recipe", default="code", choices=("code", "ds_fixed", "ds_var", "hybrid", "realistic"),
                   help="the original code's recipe, the paper's data sets, or realistic: structured cell/tissue "
                        "backgrounds, SNR 2-30, camera noise, 8/12/16 bit (docs/simulator.md; default: code)")
    p.add_argument("--spots", type=int, nargs="+", default=None, metavar="N",
                   help="spots per image: N, or LOW HIGH drawn per image (default 10 100; realistic: its "
                        "density, none to crowded)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    group = p.add_argument_group("realistic recipe")
    group.add_argument("--background", nargs="+", metavar="IMAGE",
                       help="real 2D images whose backgrounds (their spots removed) join the synthetic ones")
    group.add_argument("--background-part", default="all", choices=("all", "train", "validation", "test"),
                       help="the part of each real image used: train = left half, validation = top-right "
                            "quarter, test = bottom-right quarter, so that the three never share pixels "
                            "(default all)")
    group.add_argument("--kinds", nargs="+", choices=("cells", "tissue", "paper", "flat", "real"),
                       help="background kinds to draw from (default: all; real needs --background)")
    group.add_argument("--snr", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="spot SNR range, log-uniform (default 2 30; LOW = HIGH fixes it)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same images")
    p.set_defaults(func=cmd_simulate)

    p = command("evaluate", help="F1, precision, recall, ... against ground truth, vs baselines",
                       description="Scores DeepSpot + the fixed detector, the same detector on the raw images and "
                                   "Big-FISH (if installed) on annotated images, per image then per data set (mean "
                                   "with 95% CI), the paper's way; writes evaluation.md, evaluation.csv, "
                                   "evaluation_per_image.csv and evaluation_f1.png into the output folder.")
    common(p)
    p.add_argument("datasets", nargs="*", metavar="[NAME=]FOLDER[,CSV_FOLDER]",
                   help="a folder with images/ and csv/ (as written by 'deepspot simulate'), or a folder of images "
                        "with CSVs of the same file stems beside them or in CSV_FOLDER")
    p.add_argument("--simulated", action="store_true",
                   help="also regenerate the paper's test sets DS_fixed_10..100 and DS_var_10..100")
    p.add_argument("--n-images", type=int, default=None,
                   help="--simulated: images per set (default 40, the paper's); --realistic: default 20")
    p.add_argument("--sets", nargs="+", metavar="NAME", help="--simulated: only these sets (e.g. DS_var_50)")
    p.add_argument("--seed", type=int, default=0, help="--simulated: seed of the test sets (default 0)")
    p.add_argument("--size", type=int, default=256, help="--simulated: image side (default 256)")
    p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--finetune", action="store_true",
                   help="the fine-tuning protocol instead: cut each annotated image in two halves, fine-tune on "
                        "one with the training defaults, score the other before and after (and the reverse); "
                        "writes finetune.md, finetune.csv, finetune_curves.png")
    p.add_argument("--seeds", type=int, default=3, help="--finetune: training seeds per half (default 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="--finetune: at most this many epochs (default: the training default, deepspot train's)")
    group = p.add_argument_group("realistic benchmark")
    group.add_argument("--realistic", action="store_true",
                       help="the realistic test family: SNR bins 2-20, densities, images without spots; DeepSpot "
                            "(--weights and --compare), Big-FISH and U-FISH (writes realistic.md too)")
    group.add_argument("--compare", nargs="+", metavar="WEIGHTS",
                       help="--realistic: more models to score (files, or bundled names such as hybrid)")
    group.add_argument("--realdata", metavar="DIR",
                       help="--realistic: the realdata folder with the real backgrounds (default $DEEPSPOT_REALDATA, "
                            "else ../shared/realdata)")
    group.add_argument("--peers", metavar="DIR",
                       help="--realistic: the peers folder with U-FISH's ONNX model (default $DEEPSPOT_PEERS, else "
                            "../shared/peers)")
    p.add_argument("--no-raw", action="store_true", help="leave out the raw-image baseline")
    p.add_argument("--no-bigfish", action="store_true", help="leave out the Big-FISH baseline")
    p.add_argument("--bigfish-spot-radius", type=float, metavar="PX",
                   help="Big-FISH LoG sigma and minimum distance in pixels (default: "
                        "evaluate.BIGFISH_SPOT_RADIUS_PX = 1.5, chosen on validation data)")
    detection(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("train", help="train or fine-tune the network on annotated images and/or simulated ones",
                       description="Fine-tunes the current model (default: the bundled weights) on images paired "
                                   "with ground-truth CSVs (y,x), in the C core. Each epoch writes a checkpoint "
                                   "(weights + optimizer state) to the output folder; an interrupted run continues "
                                   "with --resume; early stopping keeps the best weights (best.safetensors).")
    common(p)
    p.add_argument("data", nargs="*", help="[NAME=]FOLDER[,CSV_FOLDER]: images + CSVs paired by file stem "
                                           "(simulate's images/ + csv/ layout works as is)")
    p.add_argument("-o", "--output", required=True, help="run folder: checkpoints, best.safetensors, curves.png")
    p.add_argument("--resume", action="store_true", help="continue the run found in the output folder")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"at most this many epochs (default {DEFAULT_EPOCHS}; about 5 minutes on a 2-core CPU for "
                        "one annotated image); early stopping usually ends sooner")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step (default 8)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="Adam's learning rate (default 1e-4)")
    p.add_argument("--validation-split", type=float, default=0.2,
                   help="held out for validation (default 0.2): whole images from 5 images on, else a strip along "
                        "one edge of each image; 0: none")
    p.add_argument("--validation", nargs="+", metavar="[NAME=]FOLDER[,CSV_FOLDER]",
                   help="annotated images held out for validation (instead of --validation-split)")
    p.add_argument("--target-background", default="model", type=_target_background, metavar="LEVEL",
                   help="the training target's background: model (the one the weights were made for; default), "
                        "paper (kept as it is, the paper's), or a level in (0, 1] it is scaled to")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                   help=f"epochs without a better monitored value (--monitor) before stopping (default {DEFAULT_PATIENCE})")
    p.add_argument("--monitor", default="loss", choices=("f1", "loss"),
                   help="what picks the best epoch: the validation loss (default) or the validation detection F1")
    p.add_argument("--no-augment", action="store_true",
                   help="no random rotations, flips and background offsets of the training crops")
    p.add_argument("--no-annotation-check", action="store_true",
                   help="skip the check for incomplete annotations before training (it enhances every training "
                        "image once; simulated data are complete by construction)")
    p.add_argument("--batch-norm", default=None, choices=("frozen", "batch"),
                   help="frozen: batch norm keeps its moving statistics in training (the default when fine-tuning "
                        "on the CPU); batch: Keras' batch statistics (the default from scratch and on the GPU)")
    p.add_argument("--max-term", default="batch", choices=("batch", "per_image", "none"),
                   help="the loss's max term: the original code's batch form or the paper's per-image form")
    p.add_argument("--bn-bessel", action="store_true",
                   help="BN moving variance from the unbiased batch variance (TF 2.x, which trained the published "
                        "weights) instead of the biased one (Keras 3)")
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="add N freshly simulated images each epoch (and train on N simulated ones if no data)")
    p.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE,
                   help=f"side of the random training crops, a multiple of 8 (default {DEFAULT_PATCH_SIZE})")
    p.add_argument("--from-scratch", action="store_true", help="start from a random initialisation")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the crops, augmentation, validation split and dropout")
    p.set_defaults(func=cmd_train)

    p = command("polarity", help="where the RNA goes in each cell: spots per section toward a wound, DypFISH's index",
                description="The paper's wound-healing analysis (docs/polarity.md): per cell, the spots in the "
                            "cytoplasm of equal angular sections around the nucleus centroid, the first centred on "
                            "the wound; per group, DypFISH's polarity index (-1..1) with its bootstrap error and a "
                            "Mann-Whitney p-value. Writes cells.csv (one row per cell, skipped cells with the reason), "
                            "summary.csv (one row per group) and polarity.png.")
    common(p)
    p.add_argument("fields", nargs="+", type=_polarity_field, metavar="[GROUP=]SPOTS,CELLS,NUCLEI[,WOUND]",
                   help="one field of view: SPOTS a spots CSV (y,x; e.g. run's <name>.spots.csv) or an image (its "
                        "spots are detected first), CELLS and NUCLEI label images of its shape (0 = background), WOUND "
                        "a CSV of (y,x) vertices along this field's wound edge (one row: a point). Fields with the "
                        "same GROUP (e.g. migrating, control) are pooled (default group: all)")
    p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in the folder")
    where = p.add_mutually_exclusive_group()  # the wound, for fields without a WOUND CSV
    where.add_argument("--angle", type=float, metavar="DEG",
                       help="the wound's direction: 0 = right, 90 = up on screen (toward row 0)")
    where.add_argument("--towards", type=float, nargs=2, metavar=("Y", "X"), help="a point in the wound")
    where.add_argument("--wound", metavar="CSV", help="a CSV of (y,x) vertices along the wound edge")
    p.add_argument("--sections", type=int, default=3, help="equal angular sections per cell")
    p.add_argument("--rotate", action="store_true",
                   help="DypFISH's rotation: turn the sections (1-degree steps, within half a section) to where the "
                        "wound section is densest")
    p.add_argument("--compartments", choices=("whole", "cytoplasm"), default="whole",
                   help="CELLS are whole cells (nuclei inside) or cytoplasm only (nucleus k belongs to cell k)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates of the index's error")
    p.add_argument("--sample-size", type=int, default=400, help="values drawn per cell in each bootstrap replicate")
    p.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap")
    p.set_defaults(func=cmd_polarity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to repeat the command (train's resume hint)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"deepspot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        Progress.end_line()
        print(f"deepspot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
