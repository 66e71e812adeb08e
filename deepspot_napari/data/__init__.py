"""Bundled sample data: a simulated smFISH image with its ground-truth spots (tools/make_sample_data.py)."""
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sample_image_path() -> Path:
    return _HERE / "sample_smfish.tif"


def sample_spots_path() -> Path:
    """CSV with header y,x (pixels, 0-based)."""
    return _HERE / "sample_smfish_spots.csv"
