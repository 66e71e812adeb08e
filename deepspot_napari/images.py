"""Input checks and scaling shared by the API, the CLI and the widgets: what an image must be
before it reaches the C core, with errors that say what was expected."""
from __future__ import annotations

import functools

import numpy as np

# Inputs that are valid but unlikely to be what was meant (unlikely_input):
MIN_SIDE_PX = 32  # the network learnt on 256 px crops; a smaller image is mostly its mirrored padding
SPOT_SIGMA_PX = 1.5  # the smoothing that brings a diffraction-limited spot out of the pixel noise
BACKGROUND_SIGMA_PX = 8.0  # subtracted, so that a smooth gradient is not mistaken for structure
# Pure noise reaches 3-7.6 sigmas here (Gaussian or Poisson, 64 to 1024 px); one simulated spot, dense
# simulated spots (20 on 64x64 px) or the real images of ../shared/realdata, 20 and more.
NOISE_SIGMAS = 10.0


class UnlikelyInputWarning(UserWarning):
    """The image is valid, but unlikely to be what the user meant (see unlikely_input)."""


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


def _mad_sigma(values: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _detail_filter(planes: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return (ndimage.gaussian_filter(planes, (0, SPOT_SIGMA_PX, SPOT_SIGMA_PX))
            - ndimage.gaussian_filter(planes, (0, BACKGROUND_SIGMA_PX, BACKGROUND_SIGMA_PX)))


@functools.lru_cache(maxsize=None)
def _white_noise_gain() -> float:
    """The standard deviation _detail_filter gives unit white noise: the root sum of squares of its kernel."""
    impulse = np.zeros((1, 8 * int(BACKGROUND_SIGMA_PX) + 1, 8 * int(BACKGROUND_SIGMA_PX) + 1), np.float64)
    impulse[0, impulse.shape[1] // 2, impulse.shape[2] // 2] = 1
    return float(np.sqrt((_detail_filter(impulse) ** 2).sum()))


def unlikely_input(image: np.ndarray) -> list[str]:
    """Why a valid image (2D or a stack) is unlikely to be what the user meant, if it is: a side under
    MIN_SIDE_PX, or no structure above noise. The noise test: smoothed with a SPOT_SIGMA_PX Gaussian,
    minus a BACKGROUND_SIGMA_PX one, the image's maximum lies within NOISE_SIGMAS noise sigmas of its
    median. The noise sigma is the smaller of two robust estimates (1.4826 x a median absolute
    deviation): that of the filtered image, and that of neighbouring pixels' differences times the
    filter's gain for white noise (many spots inflate the first, smooth spots barely touch the second)."""
    reasons = []
    if min(image.shape[-2:]) < MIN_SIDE_PX:
        reasons.append(f"the image is only {image.shape[-2]}x{image.shape[-1]} px, smaller than the network's "
                       f"receptive field (a side under {MIN_SIDE_PX} px is mostly padding to it): spots may be "
                       "missed or invented")
    planes = image.astype(np.float32).reshape((-1,) + image.shape[-2:])
    detail = _detail_filter(planes)
    median = float(np.median(detail))
    noise = _mad_sigma(detail)
    differences = _mad_sigma(np.diff(planes, axis=-1)) / np.sqrt(2) * _white_noise_gain()
    if differences > 0:
        noise = min(noise, differences)
    peak = float(detail.max()) - median
    if noise > 0 and peak < NOISE_SIGMAS * noise:
        reasons.append(f"the image shows no structure above noise (its brightest detail is {peak / noise:.1f} "
                       f"noise sigmas above the background, spots reach {NOISE_SIGMAS:g} and more): is it the "
                       "right image or channel? The spots found are likely noise")
    return reasons
