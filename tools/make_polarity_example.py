#!/usr/bin/env python3
"""The worked example of docs/polarity.md, end to end: simulated wound-healing fields (cells whose
beta-actin-like mRNA is enriched toward a wound above them, and control cells with uniform mRNA), each
written as an image with its cell and nucleus masks; spots detected by the bundled model; the
`deepspot polarity` command run on both groups; its outputs copied to docs/polarity/.

    python tools/make_polarity_example.py [--out docs/polarity] [--fields 3]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "polarity")
    parser.add_argument("--fields", type=int, default=3, help="fields of 12 cells per group")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import tifffile

    from deepspot_napari.polarity import simulated_field
    work = Path(tempfile.mkdtemp(prefix="polarity-example-"))
    try:
        fields = []
        for group, enrichment, first_seed in (("migrating", 0.7, 100), ("control", 0.0, 200)):
            for k in range(args.fields):
                f = simulated_field(first_seed + k, enrichment=enrichment, direction=90.0)
                stem = work / f"{group}{k + 1}"
                for suffix, key in (".tif", "image"), ("_cells.tif", "cells"), ("_nuclei.tif", "nuclei"):
                    tifffile.imwrite(f"{stem}{suffix}", f[key])
                fields.append(f"{group}={stem}.tif,{stem}_cells.tif,{stem}_nuclei.tif")
        (work / "wound.csv").write_text("y,x\n-1,0\n-1,383\n")  # the wound edge, just above the field
        command = [sys.executable, "-m", "deepspot_napari.cli", "polarity", *fields, "--wound",
                   str(work / "wound.csv"), "-o", str(work / "out"), "-q"]
        print("$ deepspot polarity " + " ".join(a.replace(str(work) + "/", "") for a in command[4:]))
        subprocess.run(command, check=True, cwd=ROOT)
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("cells.csv", "summary.csv", "polarity.png"):
            shutil.copy(work / "out" / name, args.out / name)
            print(f"wrote {args.out / name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
