"""Input checks and scaling shared by the API, the CLI and the widgets: what an image must be
before it reaches the C core, with errors that say what was expected."""
from __future__ import annotations

import numpy as np


def as_image_stack(image, name: str = "image") -> np.ndarray:
    """Validates `image` (2D, or a stack whose last two axes are Y, X) and returns it as an array.

    Raises TypeError for non-numeric, bool or complex data, ValueError for empty, 1-D, RGB-like,
    non-finite, all-zero or constant input."""
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except Exception as exc:  # noqa: BLE001 - anything unconvertible is a type error for the user
            raise TypeError(f"{name} must be a numeric array, got {type(image).__name__}") from exc
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"{name} has dtype {image.dtype}; expected an integer or floating-point greyscale image")
    if image.ndim < 2:
        raise ValueError(f"{name} has {image.ndim} dimension(s) (shape {image.shape}); expected a 2D image (Y, X) "
                         "or a stack (..., Y, X)")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    if image.ndim == 3 and image.shape[-1] in (3, 4) and min(image.shape[:2]) > 4:
        raise ValueError(f"{name} of shape {image.shape} looks like an RGB(A) colour image; expected a greyscale "
                         "image (Y, X) or a stack (..., Y, X): convert it to one channel first")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError(f"{name} contains NaN or Inf values; expected finite intensities")
    return image


def scale_plane(plane: np.ndarray, where: str = "image", max_value: float | None = None) -> np.ndarray:
    """The reference input scaling: float32, divided by the plane's own maximum (or by max_value,
    e.g. the maximum of the whole image a block was cut from)."""
    plane = plane.astype(np.float32, copy=False)
    peak, low = float(plane.max()), float(plane.min())
    if max_value is not None:
        if not np.isfinite(max_value) or max_value < peak:
            raise ValueError(f"max_value {max_value} must be finite and at least the {where}'s maximum {peak}")
        peak = float(max_value)
    if peak <= 0:
        raise ValueError(f"{where} has maximum {peak}; the reference scaling divides by the maximum, so an "
                         "all-zero or non-positive image cannot be enhanced")
    if peak == low:
        raise ValueError(f"{where} is constant (every pixel is {peak}): there is nothing to enhance")
    return plane / np.float32(peak)
