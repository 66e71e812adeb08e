"""Where the data made outside the project lives: $DEEPSPOT_REALDATA (real images), else
../shared/realdata beside the repository, and $DEEPSPOT_PEERS (other tools' models), else
../shared/peers. Tests that need it skip, saying what is missing, where they looked and which
variable points elsewhere, when it is absent."""
import os
from pathlib import Path

import numpy as np
import pytest

REALDATA = Path(os.environ.get("DEEPSPOT_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))
PEERS = Path(os.environ.get("DEEPSPOT_PEERS", Path(__file__).resolve().parents[2] / "shared" / "peers"))
ANNOTATED = REALDATA / "annotated" / "insta_smfish_293t_tfrc"


def annotated_real_image() -> tuple[np.ndarray, np.ndarray]:
    """The real expert-annotated smFISH image (450x700 uint8) and its (y, x) points, or a skip."""
    image, spots = ANNOTATED / "image.tif", ANNOTATED / "spots.csv"
    if not (image.is_file() and spots.is_file()):
        pytest.skip(f"the real annotated smFISH image is not at {ANNOTATED} (set DEEPSPOT_REALDATA to the folder "
                    "holding annotated/insta_smfish_293t_tfrc; see its SOURCES.md)")
    from deepspot_napari.io import read_image
    from deepspot_napari.simulate import read_spots_csv
    return np.asarray(read_image(image)), read_spots_csv(spots)
