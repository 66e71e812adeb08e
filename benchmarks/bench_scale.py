"""End-to-end throughput of whole data sets: megapixels per second for `deepspot run` (read,
enhance, detect, write the enhanced image and the spots CSV), one process against a Dask
LocalCluster of single-threaded worker processes, on

  * one large image (default 4096 x 4096, a TIFF): whole in memory, in blocks in one process,
    and in blocks on the cluster (the blocks are the tasks);
  * a folder of fields (default 100 of 1024 x 1024 TIFFs): one process (the C core using every
    core for each image in turn) and the cluster (the files are the tasks).

The images are simulated (deepspot_napari.simulate) into a temporary folder; generating them is
not timed, nor is starting the cluster (reported separately: a cluster is usually long-lived).
The runs go through the CLI's own code path (deepspot_napari.cli.main), and the outputs of the
cluster runs are compared with the single-process ones. Prints a Markdown table.

    python benchmarks/bench_scale.py                      # the full benchmark (about half an hour on 2 cores)
    python benchmarks/bench_scale.py --size 1024 --fields 8 --field-size 512   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io as _io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from checkout import import_package  # benchmarks/ is the script's directory


def _simulate(args, root: Path) -> tuple[Path, Path]:
    import tifffile
    from deepspot_napari.simulate import simulate_image
    rng = np.random.default_rng(args.seed)
    large_dir, fields_dir = root / "large", root / "fields"
    large_dir.mkdir()
    fields_dir.mkdir()
    if args.size:
        image, _ = simulate_image(rng, "ds_var", n_spots=max(10, args.size ** 2 // 10_000), size=args.size)
        tifffile.imwrite(large_dir / f"mosaic{args.size}.tif", image)
    for i in range(args.fields):
        image, _ = simulate_image(rng, "ds_var", n_spots=int(rng.integers(20, 200)), size=args.field_size)
        tifffile.imwrite(fields_dir / f"field{i:03d}.tif", image)
    return large_dir, fields_dir


def _run(argv: list[str]) -> float:
    from deepspot_napari.cli import main
    out = _io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"deepspot {' '.join(argv)} failed ({code}):\n{out.getvalue()}")
    return seconds


def _spots(folder: Path) -> dict[str, list]:
    tables = {}
    for path in sorted(folder.glob("*.spots.csv")):
        with open(path, newline="") as f:
            tables[path.name] = list(csv.reader(f))
    return tables


def _same_outputs(a: Path, b: Path) -> str:
    from deepspot_napari.io import read_image
    if _spots(a) != _spots(b):
        return "no (spots)"
    for path in sorted(p for p in a.iterdir() if ".enhanced." in p.name):
        if not np.allclose(read_image(path), read_image(b / path.name), rtol=0, atol=1e-6):
            return f"no ({path.name})"
    return "yes"


def _count_spots(folder: Path) -> int:
    return sum(len(rows) - 1 for rows in _spots(folder).values())


def main() -> int:
    import_package()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="side of the large image (0: skip it)")
    parser.add_argument("--fields", type=int, default=100, help="number of fields (0: skip them)")
    parser.add_argument("--field-size", type=int, default=1024, help="side of each field")
    parser.add_argument("--block-size", type=int, default=2048, help="block size for the large image")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (1 thread each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write the data and outputs here instead of a temporary folder")
    args = parser.parse_args()

    import distributed
    from deepspot_napari.model import Model

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="deepspot-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        start = time.perf_counter()
        large_dir, fields_dir = _simulate(args, root)
        print(f"simulated the inputs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        Model.load()  # warm the page cache for the weights
        start = time.perf_counter()
        with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=None) as cluster:
            cluster_start = time.perf_counter() - start
            address = cluster.scheduler_address
            if args.size:
                mpx = args.size ** 2 / 1e6
                label = f"1 image {args.size}x{args.size}"
                runs = [("1 process, whole image in memory", "whole", []),
                        (f"1 process, blocks of {args.block_size}", "blocks", ["--block-size", str(args.block_size)]),
                        (f"Dask {args.workers} workers x 1 thread, blocks of {args.block_size}", "dask",
                         ["--block-size", str(args.block_size), "--scheduler", address])]
                for name, folder, extra in runs:
                    print(f"{label}: {name} ...", file=sys.stderr)
                    seconds = _run(["run", str(large_dir), "-o", str(root / f"large-{folder}"), "--save-enhanced",
                                    "--output-format", "zarr", "-q", *extra])
                    same = "-" if folder == "whole" else _same_outputs(root / "large-whole", root / f"large-{folder}")
                    rows.append((label, name, seconds, mpx / seconds, _count_spots(root / f"large-{folder}"), same))
            if args.fields:
                mpx = args.fields * args.field_size ** 2 / 1e6
                label = f"{args.fields} fields {args.field_size}x{args.field_size}"
                for name, folder, extra in [("1 process", "fields-local", []),
                                            (f"Dask {args.workers} workers x 1 thread", "fields-dask",
                                             ["--scheduler", address])]:
                    print(f"{label}: {name} ...", file=sys.stderr)
                    seconds = _run(["run", str(fields_dir), "-o", str(root / folder), "--save-enhanced", "-q", *extra])
                    same = "-" if folder == "fields-local" else _same_outputs(root / "fields-local", root / folder)
                    rows.append((label, name, seconds, mpx / seconds, _count_spots(root / folder), same))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n`deepspot run --save-enhanced` end to end (read, enhance, detect, write enhanced + spots CSV) on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Dask LocalCluster start "
          f"{cluster_start:.1f} s (not included).\n")
    print("| data | run | wall s | Mpx/s | spots | same outputs as 1 process |")
    print("|---|---|---:|---:|---:|---|")
    for label, name, seconds, rate, spots, same in rows:
        print(f"| {label} | {name} | {seconds:.1f} | {rate:.3f} | {spots} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
