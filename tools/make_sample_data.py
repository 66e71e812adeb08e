"""(Re)make the demo image shipped with the plugin/CLI, deterministically.

    python tools/make_sample_data.py            # write the files
    python tools/make_sample_data.py --check    # exit 1 if the files differ from a fresh run

Writes ``deepspot_napari/data/sample_smfish.tif`` (512x512 uint8, one simulation of
the paper's DS_var recipe: Poisson + Perlin background with elastic deformation,
spots of 4-9 px diameter with a peak intensity drawn per spot in [160, 220]) and
``deepspot_napari/data/sample_smfish_spots.csv`` (its ground truth, header ``y,x``,
0-based row/column pixels).  Both are written atomically.  The bytes depend only on
SEED, RECIPE, N_SPOTS, SIZE and the simulator code (and, in principle, on the
floating-point results of this NumPy/SciPy build: ``--check`` tells).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "deepspot_napari" / "data"
IMAGE = DATA / "sample_smfish.tif"
SPOTS = DATA / "sample_smfish_spots.csv"

SEED = 20220104  # Biological Imaging 2, e4 (2022)
RECIPE = "ds_var"
N_SPOTS = 220
SIZE = 512


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


def build():
    """Return (tif bytes, csv bytes, image, spots)."""
    import tifffile

    S = _load_simulate()
    image, spots = S.simulate_image(np.random.default_rng(SEED), RECIPE, N_SPOTS, SIZE)
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="minisblack", metadata=None)
    return buf.getvalue(), S._spots_csv_bytes(spots), image, spots


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with the files on disk instead of writing them")
    args = ap.parse_args(argv)
    tif, csv_bytes, image, spots = build()
    if args.check:
        same = IMAGE.is_file() and SPOTS.is_file() and IMAGE.read_bytes() == tif \
            and SPOTS.read_bytes() == csv_bytes
        print(("up to date: " if same else "DIFFERENT from a fresh run: ") + f"{IMAGE}, {SPOTS}")
        return 0 if same else 1
    S = _load_simulate()
    DATA.mkdir(parents=True, exist_ok=True)
    S._atomic_write_bytes(str(IMAGE), tif)
    S._atomic_write_bytes(str(SPOTS), csv_bytes)
    print(f"wrote {IMAGE} ({len(tif)} bytes, {image.shape[0]}x{image.shape[1]} {image.dtype}, "
          f"mean {image.mean():.1f}) and {SPOTS} ({len(spots)} spots, {len(csv_bytes)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
