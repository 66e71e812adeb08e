"""deepspot-napari: DeepSpot RNA spot enhancement and detection for smFISH images.

The network and the detectors run in a C core (oneDNN on CPU, cuDNN on an NVIDIA GPU where one works:
`Model.load(device="auto")`); this package is the thin shell:
`Model.load(...).enhance(image)` / `.detect(image)`, the `deepspot` command line and napari widgets."""
from .detect import DEFAULT_DETECTION, DetectionParams, Spots, detect_spots
from .model import Cancelled, Model, bundled_weights_path

__all__ = ["Model", "Cancelled", "bundled_weights_path", "detect_spots", "DetectionParams", "DEFAULT_DETECTION",
           "Spots"]
__version__ = "0.1.0"
