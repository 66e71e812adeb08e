"""napari sample data (File > Open Sample > DeepSpot): the bundled simulated smFISH image and the
true positions of its spots, as a Points layer to compare against what Detect finds."""
from __future__ import annotations

import numpy as np

from .data import sample_image_path, sample_spots_path
from .io import read_image
from .simulate import read_spots_csv


def make_sample_data() -> list[tuple]:
    image = read_image(sample_image_path())
    truth = read_spots_csv(sample_spots_path())
    points = (np.asarray(truth, dtype=float).reshape(-1, 2),
              {"name": "smFISH sample: true spots", "size": 6.0, "face_color": "transparent",
               "border_color": "#00e5ff", "border_width": 0.15, "symbol": "ring", "visible": True},
              "points")
    return [(image, {"name": "smFISH sample", "colormap": "gray"}, "image"), points]
