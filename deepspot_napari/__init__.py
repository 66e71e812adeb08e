"""deepspot-napari: DeepSpot RNA spot enhancement and detection for smFISH images.

The network and the detectors run in a C core (oneDNN on CPU, cuDNN on an NVIDIA GPU where one works:
`Model.load(device="auto")`); this package is the thin shell:
`Model.load(...).enhance(image)` / `.detect(image)`, the `deepspot` command line and napari widgets."""
from pathlib import Path


def _check_core_is_built() -> None:
    """A clear ImportError when the C core was never built here: in a source checkout, Python run
    from the clone's root imports this source folder rather than the installed package."""
    here = Path(__file__).resolve().parent
    if not any(here.glob("_core.*")):
        raise ImportError(
            f"deepspot_napari's C core (the _core extension) is not built in {here}. This is the source "
            "tree, not the installed package: either build the extension in place (tools/dev_build.sh in "
            "the repository) or run Python from another folder so that the installed package is imported "
            "(pip install . installs it)")


_check_core_is_built()

from .detect import DEFAULT_DETECTION, DetectionParams, Spots, detect_spots  # noqa: E402
from .model import Cancelled, Model, bundled_weights_path  # noqa: E402

__all__ = ["Model", "Cancelled", "bundled_weights_path", "detect_spots", "DetectionParams", "DEFAULT_DETECTION",
           "Spots"]
__version__ = "0.1.0"
