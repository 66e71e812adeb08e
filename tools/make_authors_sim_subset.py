"""Writes tests/data/authors_sim_subset.npz: the first 8 (by file name) of the authors' 50 simulated
images (github cbib/DeepSpot, test_data/dataset1/train; MIT licence (c) 2021 E. Bouilhol et al.), so
that the simulator tests that compare with the authors' own images run everywhere. Holds each image,
its spots (the csv/ folder's y, x) and its training target, stored as the pixels where the target
differs from the image.

    python3 tools/make_authors_sim_subset.py [--authors-sim DIR]
        (default $DEEPSPOT_AUTHORS_SIM, else $DEEPSPOT_REALDATA/deepspot_authors_sim, else
        ../shared/realdata/deepspot_authors_sim beside the repository)
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from deepspot_napari.simulate import read_spots_csv  # noqa: E402

COUNT = 8
OUT = REPO_ROOT / "tests" / "data" / "authors_sim_subset.npz"


def default_folder() -> Path:
    realdata = Path(os.environ.get("DEEPSPOT_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))
    return Path(os.environ.get("DEEPSPOT_AUTHORS_SIM", realdata / "deepspot_authors_sim"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors-sim", type=Path, default=None, help="folder with original/, target/, csv/")
    folder = parser.parse_args().authors_sim or default_folder()
    files = sorted((folder / "original").glob("*.png"))[:COUNT]
    if len(files) < COUNT:
        sys.exit(f"fewer than {COUNT} images in {folder / 'original'}")
    images = np.stack([np.array(Image.open(f)) for f in files])
    targets = np.stack([np.array(Image.open(folder / "target" / f.name)) for f in files])
    spots = [read_spots_csv(folder / "csv" / f"{f.stem}.csv") for f in files]
    changed = np.flatnonzero(targets != images)
    np.savez_compressed(OUT, names=np.array([f.stem for f in files]), images=images,
                        spot_counts=np.array([len(s) for s in spots]), spots=np.concatenate(spots),
                        target_index=changed, target_value=targets.reshape(-1)[changed])
    print(f"{OUT}: {COUNT} images, {sum(map(len, spots))} spots, {OUT.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
