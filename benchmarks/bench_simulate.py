"""Images per second of deepspot_napari.simulate, per recipe, single thread of Python.

    python benchmarks/bench_simulate.py [--n 200] [--size 256] [--targets]

Prints one line per recipe (best of --repeat timed runs of --n images each, after a
warm-up); ``--targets`` also times make_target.  The code recipe's target is
>= 50 images/s at 256x256; the exit status is 1 when it is missed and
``--check`` is given.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load_simulate():
    sys.path.insert(0, str(ROOT))
    try:
        from deepspot_napari import simulate
        return simulate
    except ImportError:  # the package __init__ may need the (unbuilt) C extension
        spec = importlib.util.spec_from_file_location(
            "deepspot_napari_simulate", ROOT / "deepspot_napari" / "simulate.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images per timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per recipe (best is kept)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--recipes", default="code,ds_fixed,ds_var,hybrid")
    ap.add_argument("--targets", action="store_true", help="include make_target in the timing")
    ap.add_argument("--check", action="store_true", help="exit 1 if code recipe < 50 images/s")
    args = ap.parse_args(argv)
    S = _load_simulate()
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cpus, "
          f"{platform.processor() or platform.machine()}; size {args.size}, n {args.n}, "
          f"best of {args.repeat}{', with make_target' if args.targets else ''}")
    results = {}
    for recipe in args.recipes.split(","):
        rng = np.random.default_rng(0)
        for _ in range(3):  # warm-up
            S.simulate_image(rng, recipe, None, args.size)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _ in range(args.n):
                img, spots = S.simulate_image(rng, recipe, None, args.size)
                if args.targets:
                    S.make_target(img, spots)
            best = min(best, time.perf_counter() - t0)
        ips = args.n / best
        results[recipe] = ips
        print(f"{recipe:9s} {ips:7.1f} images/s  ({1e3 / ips:5.2f} ms/image)")
    if args.check and results.get("code", float("inf")) < 50:
        print("code recipe below the 50 images/s target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
