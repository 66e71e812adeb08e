"""The models shipped with the package: their names and where their weights files are.

A module of its own, below model.py and devices.py (whose GPU self-test runs the default model),
so that neither has to import the other."""
from __future__ import annotations

from pathlib import Path

# The models shipped in weights/, by the name Model.load, --weights and the widgets' menu take: the
# general model trained here (the default; weights/README.md) and the authors' published one.
BUNDLED_MODELS = {"general": "deepspot_general.safetensors", "hybrid": "deepspot_hybrid.safetensors"}
DEFAULT_MODEL = "general"
BUNDLED_WEIGHTS = BUNDLED_MODELS[DEFAULT_MODEL]


def bundled_weights_path(name: str = BUNDLED_WEIGHTS) -> Path:
    """The weights shipped with the package (installed next to it; the source tree's weights/ in a
    checkout): a file name, or a model name of BUNDLED_MODELS."""
    name = BUNDLED_MODELS.get(name, name)
    here = Path(__file__).resolve().parent
    for candidate in (here / "weights" / name, here.parent / "weights" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"bundled weights '{name}' not found next to the package ({here / 'weights'})")


def weights_path(weights: str | Path | None) -> Path:
    """The file of a weights argument: a path, a bundled model's name (BUNDLED_MODELS; a file of
    that name in the working folder wins), or None for the default bundled model."""
    if weights is None or (isinstance(weights, str) and weights in BUNDLED_MODELS and not Path(weights).is_file()):
        return bundled_weights_path(DEFAULT_MODEL if weights is None else weights)
    return Path(weights)


def bundled_models() -> list[str]:
    """The names of BUNDLED_MODELS whose weights are installed, the default first."""
    names = [DEFAULT_MODEL] + [n for n in BUNDLED_MODELS if n != DEFAULT_MODEL]
    available = []
    for name in names:
        try:
            bundled_weights_path(name)
        except FileNotFoundError:
            continue
        available.append(name)
    return available
