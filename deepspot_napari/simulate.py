"""Simulated smFISH images and DeepSpot training targets (NumPy/SciPy only).

This module reproduces the authors' image simulator (github cbib/DeepSpot,
``FISH_simulator/spot_simulator.py``) and the datasets described in the paper
(Bouilhol et al., Biological Imaging 2, e4, 2022, Table 1).  It never imports
the package's C extension, so it works in an environment where that is not
built.

Recipes (``simulate_image(..., recipe=...)``)
---------------------------------------------
``"code"``
    The recipe of the authors' script, step by step:

    * background, generated at 2x the output size: N(0, 1) noise rescaled to
      [0, U{50..100}] plus 5-octave fractal Perlin noise (persistence 0.5, base
      period L in {2, 4, 8, 16} lattice cells per side) rescaled to
      [0, U{50..100}]; the sum rescaled to [0, B], B ~ U{80..150}; elastically
      deformed (random ``points x points`` grid, ``points ~ U{2..6}``, of
      N(0, sigma^2) displacements, ``sigma ~ U{10..20}`` px, cubic B-spline
      interpolated; cubic image interpolation, zero outside) and centre-cropped
      to the output size; rescaled to [0, B] again;
    * spots: single pixels at uniform positions in [2, size-3] (rows and
      columns), each convolved ('same' mode) with its own normalised kernel
      ``gaussian_kernel(U{13..18}, U{4..8})`` (sigma = size / (2 std), 0.81 to
      2.25 px), summed, rescaled to [0, U{160..220}];
    * image = spots + background, rescaled to [0, 255], rounded to uint8.

    Faithful quirk: for an even kernel size the 'same' convolution puts the
    Gaussian centre half a pixel below/right of the annotated pixel (as in the
    authors' data).  Deliberate differences: positions are drawn without
    replacement, so ``n_spots`` is the exact spot count (the script drew
    ``spot_number + 1`` positions with replacement and silently dropped
    duplicated pixels from the ground truth).

``"ds_fixed"`` / ``"ds_var"``
    The paper's DS_fixed / DS_var datasets: background Poisson noise + Perlin
    noise with intensity in [80, 150], elastically deformed (same pipeline as
    above with Poisson instead of Gaussian noise); spots of diameter
    D ~ U[4, 9] px (sigma = D / 4, a pixel-integrated Gaussian centred on the
    annotated pixel, peak 1) times a peak intensity drawn in [160, 220]: once
    per image (fixed) or once per spot (var); image = spots + background
    rescaled to [0, 255] (as in the code, so the ratio spot/background is what
    is kept).

``"hybrid"``
    The simulated part of DS_hybrid: as ``ds_var`` but each spot's peak is
    ``SNR * noise_std`` with SNR ~ U[10, 40] per spot, where ``noise_std`` is
    the standard deviation of the background's pixel-scale noise (background
    minus its Gaussian blur, sigma 2 px).  Default spot count U{10..100}.

Ground truth
------------
``spots`` arrays are float ``(n, 2)`` arrays of ``(y, x)`` = (row, column),
0-based pixels, sorted row-major.  CSV files written here have the header
``y,x``.  NOTE: the authors' script stored ``x,y`` (column, row) without a
header; :func:`read_spots_csv` reads both (a header-less file is taken as
``x,y``).

Targets
-------
``make_target`` writes the 3x3 stamp [[200,230,200],[230,255,230],[200,230,200]]
centred at each (rounded) spot on a copy of the image (where stamps overlap the
larger stamp value wins, so every centre is 255; stamps are clipped at the
borders).
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtr

__all__ = [
    "RECIPES",
    "STAMP",
    "SimulatedImage",
    "simulate_image",
    "simulate_components",
    "make_target",
    "simulate_dataset",
    "paper_test_sets",
    "paper_test_set_names",
    "perlin_noise",
    "fractal_noise",
    "code_gaussian_kernel_1d",
    "write_spots_csv",
    "read_spots_csv",
]

RECIPES = ("code", "ds_fixed", "ds_var", "hybrid")
STAMP = np.array([[200, 230, 200], [230, 255, 230], [200, 230, 200]], dtype=np.uint8)

MIN_SIZE = 32
_BORDER = 2  # spots at [2, size - 3] as in the authors' script (randrange(2, size - 2))

# Default spot counts: the script's spot_number (100) for "code", the paper's
# range 10..100 for the others.
_DEFAULT_N_SPOTS = {"code": 100, "ds_fixed": (10, 100), "ds_var": (10, 100), "hybrid": (10, 100)}


# --------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------
def _check_recipe(recipe):
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    return recipe


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    return int(size)


def _max_spots(size):
    return (size - 2 * _BORDER) ** 2


def _check_n_spots(n_spots, size):
    """Return ``(lo, hi)`` (inclusive) from an int or a ``(lo, hi)`` pair."""
    hi_cap = _max_spots(size)

    def _as_int(v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(
                f"n_spots must be a non-negative integer or a (lo, hi) pair of them, got {n_spots!r}")
        return int(v)

    if isinstance(n_spots, (tuple, list)):
        if len(n_spots) != 2:
            raise ValueError(f"n_spots range must be a (lo, hi) pair, got {n_spots!r}")
        lo, hi = _as_int(n_spots[0]), _as_int(n_spots[1])
    else:
        lo = hi = _as_int(n_spots)
    if lo < 0 or hi < lo:
        raise ValueError(f"n_spots must satisfy 0 <= lo <= hi, got {n_spots!r}")
    if hi > hi_cap:
        raise ValueError(
            f"n_spots must be at most {hi_cap} for size {size} (one spot per pixel of "
            f"[{_BORDER}, {size - 1 - _BORDER}]^2), got {n_spots!r}")
    return lo, hi


def _check_n_images(n_images):
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a numpy Generator, a SeedSequence or an integer seed, got {type(rng)}")


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------
def _rescale(a, hi, lo=0.0):
    """skimage.exposure.rescale_intensity(a, out_range=(lo, hi)) for float input."""
    amin = a.min()
    amax = a.max()
    if amax <= amin:
        return np.full_like(a, lo)
    scale = (hi - lo) / (amax - amin)
    out = a - amin
    out *= scale
    if lo:
        out += lo
    return out


def _fade(t):
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


_GEMM_CHUNK = 32768  # output elements per product: M*N*8 <= 262144 keeps OpenBLAS on one thread


def _small_k_matmul(a, b):
    """a (M, k) @ b (k, N) for tiny k, in chunks of <= _GEMM_CHUNK outputs.

    One big product would make OpenBLAS start its thread pool, which on a busy
    2-core machine made the simulator 3-5x slower; small products stay on the
    calling thread (each output is the same k-term dot product either way).
    """
    m, n = a.shape[0], b.shape[1]
    out = np.empty((m, n), dtype=np.result_type(a, b))
    if m * n <= _GEMM_CHUNK:
        return np.matmul(a, b, out=out)
    if m >= n:
        step = max(1, _GEMM_CHUNK // n)
        for i in range(0, m, step):  # <= 8 chunks at 512x512
            np.matmul(a[i:i + step], b, out=out[i:i + step])
    else:
        step = max(1, _GEMM_CHUNK // m)
        for j in range(0, n, step):
            np.matmul(a, b[:, j:j + step], out=out[:, j:j + step])
    return out


def perlin_noise(rng, shape, res, dtype=np.float32):
    """2-D gradient (Perlin) noise with ``res = (ry, rx)`` lattice cells over ``shape``.

    Same definition as ``generate_perlin_noise_2d`` of the authors' script
    (random unit gradients at the (ry+1) x (rx+1) lattice corners, quintic fade,
    times sqrt(2)), drawing the gradient angles from ``rng``.  ``res`` may be
    fractional (then ceil(res)+1 corners are drawn per axis).  Fully vectorised:
    when an integer ``res`` divides ``shape`` the noise is one small matrix
    product (cells x 8 corner terms) @ (8 x cell pixels); otherwise it is a
    gather of the 8 corner terms over the pixels.
    """
    rng = _as_rng(rng)
    h, w = int(shape[0]), int(shape[1])
    fry, frx = float(res[0]), float(res[1])
    if h < 1 or w < 1 or not (fry > 0 and frx > 0):
        raise ValueError(f"perlin_noise needs positive shape and res, got {shape!r}, {res!r}")
    ry, rx = int(np.ceil(fry)), int(np.ceil(frx))
    ang = 2.0 * np.pi * rng.random((ry + 1, rx + 1))
    gy = np.cos(ang).astype(dtype)  # row component (the script's grid[..., 0])
    gx = np.sin(ang).astype(dtype)  # column component
    aligned = fry == ry and frx == rx and h % ry == 0 and w % rx == 0
    if aligned:
        dy, dx = h // ry, w // rx
        u = (np.arange(dy, dtype=np.float64) / dy)
        v = (np.arange(dx, dtype=np.float64) / dx)
    else:
        ty = np.arange(h, dtype=np.float64) * (fry / h)
        tx = np.arange(w, dtype=np.float64) * (frx / w)
        iy = np.minimum(ty.astype(np.int64), ry - 1)
        ix = np.minimum(tx.astype(np.int64), rx - 1)
        u = ty - iy
        v = tx - ix
    fu, fv = _fade(u), _fade(v)
    wu = (1.0 - fu, fu)
    wv = (1.0 - fv, fv)
    grads, rows, cols = [], [], []
    for a in (0, 1):
        for b in (0, 1):
            grads.append(gy[a:a + ry, b:b + rx])
            rows.append(wu[a] * (u - a))
            cols.append(wv[b])
            grads.append(gx[a:a + ry, b:b + rx])
            rows.append(wu[a])
            cols.append(wv[b] * (v - b))
    s2 = np.sqrt(2.0)
    if aligned:
        g = np.stack(grads, axis=-1).reshape(ry * rx, 8)                    # (cells, 8)
        basis = np.einsum("kp,kq->kpq", np.asarray(rows), np.asarray(cols))  # (8, dy, dx)
        basis = (s2 * basis).reshape(8, dy * dx).astype(dtype)
        out = _small_k_matmul(g, basis).reshape(ry, rx, dy, dx).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(out).reshape(h, w)
    out = np.zeros((h, w), dtype=dtype)
    for gk, rk, ck in zip(grads, rows, cols):  # 8 corner terms, each vectorised over pixels
        out += (gk[iy][:, ix] * (s2 * rk).astype(dtype)[:, None]) * ck.astype(dtype)[None, :]
    return out


def fractal_noise(rng, shape, res, octaves=5, persistence=0.5, dtype=np.float32):
    """Fractal Perlin noise: sum of ``octaves`` octaves, frequency x2, amplitude x persistence."""
    rng = _as_rng(rng)
    noise = np.zeros(shape, dtype=dtype)
    freq, amp = 1, 1.0
    for _ in range(int(octaves)):
        noise += perlin_noise(rng, shape, (freq * res[0], freq * res[1]), dtype=dtype) * amp
        freq *= 2
        amp *= persistence
    return noise


def _bspline_matrix(coords, n):
    """(len(coords), n) matrix M with M @ g = cubic-spline interpolation of samples g at coords."""
    eye = np.eye(n)
    return np.stack([ndi.map_coordinates(eye[j], coords[None, :], order=3, mode="mirror")
                     for j in range(n)], axis=1)


def elastic_deform_crop(rng, img, sigma, points, out_shape):
    """Centre crop of ``img`` after a random-grid elastic deformation (elasticdeform style).

    A ``points x points`` grid of N(0, sigma^2) displacements (one per axis) is
    spread evenly over the whole input image (corners at 0 and n-1), interpolated
    to every output pixel with cubic splines, and the image is sampled at
    ``pixel + displacement`` with cubic-spline interpolation (zero outside),
    like ``elasticdeform.deform_random_grid(img, sigma, points, crop=...)``.
    Only the region the crop can read is spline-prefiltered (with a 16 px margin
    inside the image), which matches filtering the whole image to ~1e-9.
    """
    rng = _as_rng(rng)
    H, W = img.shape
    oh, ow = out_shape
    y0 = (H - oh) // 2
    x0 = (W - ow) // 2
    disp = rng.standard_normal((2, points, points)) * sigma
    ry = np.arange(y0, y0 + oh, dtype=np.float64)
    rx = np.arange(x0, x0 + ow, dtype=np.float64)
    My = _bspline_matrix(ry * (points - 1) / (H - 1), points)  # (oh, points)
    Mx = _bspline_matrix(rx * (points - 1) / (W - 1), points)  # (ow, points)
    dyf = My @ disp[0] @ Mx.T
    dxf = My @ disp[1] @ Mx.T
    cy = ry[:, None] + dyf
    cx = rx[None, :] + dxf
    m = 16
    ya = max(0, int(np.floor(cy.min())) - m)
    yb = min(H, int(np.ceil(cy.max())) + m + 1)
    xa = max(0, int(np.floor(cx.min())) - m)
    xb = min(W, int(np.ceil(cx.max())) + m + 1)
    if ya >= yb or xa >= xb:  # everything sampled outside the image
        return np.zeros(out_shape, dtype=np.float64)
    sub = img[ya:yb, xa:xb].astype(np.float64)
    # same prefilter as map_coordinates(img, ..., mode="constant") on the whole image:
    # where the region touches the image border the region's edge is the image's
    coef = ndi.spline_filter(sub, order=3, mode="constant")
    cy = cy - ya
    cx = cx - xa
    out = ndi.map_coordinates(coef, [cy, cx], order=3, mode="constant", cval=0.0, prefilter=False)
    return out


def code_gaussian_kernel_1d(kernel_size, std):
    """The script's ``gaussian_kernel`` is ``outer(k, k) / sum``; this returns k / sum(k).

    ``k = diff(Phi(linspace(-std, std, kernel_size + 1)))``: a pixel-integrated
    Gaussian of sigma ``kernel_size / (2 std)`` pixels, truncated at +/- std sigmas.
    """
    x = np.linspace(-std, std, int(kernel_size) + 1)
    k = np.diff(ndtr(x))
    return k / k.sum()


def _integrated_gaussian_1d(sigma, half):
    """Pixel-integrated Gaussian of ``sigma`` on pixels -half..half, peak-normalised to 1.

    ``sigma`` is an array (n,); returns (n, 2*half+1).
    """
    edges = (np.arange(-half, half + 2, dtype=np.float64) - 0.5)[None, :] / sigma[:, None]
    k = np.diff(ndtr(edges), axis=1)
    return k / k[:, half:half + 1]


def _splat(size, pos, kernels, starts, weights):
    """Sum of ``weights[i] * outer(kernels[i], kernels[i])`` placed at ``pos[i] + starts[i]``.

    All spots at once with one ``np.bincount`` (no loop over spots); what falls
    outside the image is dropped (like a 'same' convolution).
    """
    n, L = kernels.shape
    if n == 0:
        return np.zeros((size, size), dtype=np.float64)
    pad = L
    side = size + 2 * pad
    r0 = pos[:, 0] + starts + pad  # (n,)
    c0 = pos[:, 1] + starts + pad
    off = np.arange(L)
    rr = r0[:, None] + off[None, :]  # (n, L)
    cc = c0[:, None] + off[None, :]
    idx = (rr[:, :, None] * side + cc[:, None, :]).ravel()
    val = ((kernels * weights[:, None])[:, :, None] * kernels[:, None, :]).ravel()
    canvas = np.bincount(idx, weights=val, minlength=side * side).reshape(side, side)
    return canvas[pad:pad + size, pad:pad + size]


def _draw_positions(rng, size, n):
    """n distinct integer (row, col) positions, uniform in [2, size-3]^2, sorted row-major."""
    span = size - 2 * _BORDER
    flat = np.sort(rng.choice(span * span, size=n, replace=False)) if n else np.zeros(0, np.int64)
    return np.stack([flat // span + _BORDER, flat % span + _BORDER], axis=1).astype(np.int64)


def _background(rng, size, noise):
    """Deformed, centre-cropped noise + fractal Perlin background in [0, B] (float64).

    Generated at 2x ``size``.  For size 256 this is exactly the script's recipe;
    for other sizes the Perlin lattice and the deformation grid are scaled with
    the image so that their periods in pixels stay those of a 256x256 image
    (a 512x512 image looks like four 256x256 ones, without seams).
    """
    big = 2 * size
    k = size / 256.0
    period = int(rng.choice([2, 4, 8, 16]))
    noise_level = int(rng.integers(50, 101))
    perlin_level = int(rng.integers(50, 101))
    full_level = int(rng.integers(80, 151))
    sigma = int(rng.integers(10, 21))
    points = int(rng.integers(2, 7))
    grid_points = max(2, int(round((points - 1) * k)) + 1)
    if noise == "gaussian":
        n = rng.standard_normal((big, big), dtype=np.float32)
    else:  # Poisson counts with mean = the drawn noise level
        n = rng.poisson(float(noise_level), (big, big)).astype(np.float32)
    n = _rescale(n, noise_level)
    res = period * k
    p = _rescale(fractal_noise(rng, (big, big), (res, res), 5, 0.5), perlin_level)
    s = n
    s += p
    s = _rescale(s, full_level)
    bg = elastic_deform_crop(rng, s, sigma, grid_points, (size, size))
    return _rescale(bg, full_level), dict(perlin_period=period, noise_level=noise_level,
                                          perlin_level=perlin_level, background_level=full_level,
                                          elastic_sigma=sigma, elastic_points=points,
                                          elastic_grid_points=grid_points)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
@dataclass
class SimulatedImage:
    """All layers of one simulation (floats before the final rounding)."""
    image: np.ndarray        # uint8 (size, size)
    spots: np.ndarray        # float (n, 2): (y, x)
    spot_layer: np.ndarray   # float64, spots only, before the final [0, 255] rescale
    background: np.ndarray   # float64, background only, before the final [0, 255] rescale
    scale: float             # image ~= rint((spot_layer + background - offset) * scale)
    offset: float
    peaks: np.ndarray        # float (n,): each spot's own peak in spot_layer units (no overlaps)
    params: dict


def _resolve_n(rng, recipe, n_spots, size):
    if n_spots is None:
        n_spots = _DEFAULT_N_SPOTS[recipe]
    lo, hi = _check_n_spots(n_spots, size)
    return lo if lo == hi else int(rng.integers(lo, hi + 1))


def simulate_components(rng, recipe="code", n_spots=None, size=256) -> SimulatedImage:
    """Simulate one image and return every layer (see :func:`simulate_image`)."""
    recipe = _check_recipe(recipe)
    size = _check_size(size)
    rng = _as_rng(rng)
    n = _resolve_n(rng, recipe, n_spots, size)
    pos = _draw_positions(rng, size, n)

    if recipe == "code":
        ks = rng.integers(13, 19, size=n)       # kernel size U{13..18}
        sd = rng.integers(4, 9, size=n)         # +/- std span U{4..8}
        L = 18
        kernels = np.zeros((n, L))
        for k_size in np.unique(ks):  # <= 6 kernel sizes x 5 spans: tiny table, not per pixel
            for s_span in np.unique(sd[ks == k_size]):
                sel = (ks == k_size) & (sd == s_span)
                kernels[sel, :k_size] = code_gaussian_kernel_1d(k_size, s_span)
        starts = -((ks - 1) // 2)  # scipy.signal.convolve2d(..., mode='same') alignment
        spot_layer = _splat(size, pos, kernels, starts, np.ones(n))
        spot_max = int(rng.integers(160, 221))
        peaks_raw = kernels.max(axis=1) ** 2
        smax = spot_layer.max() if n else 0.0
        spot_layer = _rescale(spot_layer, spot_max)
        peaks = peaks_raw * (spot_max / smax) if smax > 0 else peaks_raw * 0
        bg, params = _background(rng, size, "gaussian")
        params.update(spot_max=spot_max, sigma_px=(ks / (2.0 * sd)))
    else:
        diam = rng.uniform(4.0, 9.0, size=n)
        sig = diam / 4.0
        half = 7
        kernels = _integrated_gaussian_1d(sig, half)
        starts = np.full(n, -half)
        params = {}
        if recipe == "ds_fixed":
            amp = np.full(n, float(rng.integers(160, 221)))
        elif recipe == "ds_var":
            amp = rng.integers(160, 221, size=n).astype(np.float64)
        else:
            snr = rng.uniform(10.0, 40.0, size=n)
            amp = None
        bg, bparams = _background(rng, size, "poisson")
        params.update(bparams)
        if recipe == "hybrid":
            noise_std = float(np.std(bg - ndi.gaussian_filter(bg, 2.0)))
            amp = snr * noise_std
            params.update(noise_std=noise_std, snr=snr)
        spot_layer = _splat(size, pos, kernels, starts, amp)
        peaks = amp
        params.update(diameter_px=diam, sigma_px=sig)

    total = spot_layer + bg
    tmin, tmax = float(total.min()), float(total.max())
    scale = 255.0 / (tmax - tmin) if tmax > tmin else 0.0
    img = np.rint((total - tmin) * scale)
    image = np.clip(img, 0, 255).astype(np.uint8)
    params.update(recipe=recipe, n_spots=n, size=size)
    return SimulatedImage(image=image, spots=pos.astype(np.float64), spot_layer=spot_layer,
                          background=bg, scale=scale, offset=tmin, peaks=np.asarray(peaks, float),
                          params=params)


def simulate_image(rng, recipe="code", n_spots=None, size=256):
    """Simulate one smFISH image.

    Parameters
    ----------
    rng : numpy.random.Generator (or an int seed)
    recipe : "code" | "ds_fixed" | "ds_var" | "hybrid" (see the module docstring)
    n_spots : int, (lo, hi) inclusive range, or None for the recipe's default
        (100 for "code", U{10..100} otherwise). The count is exact.
    size : output side in pixels (>= 32); the background is generated at 2x.

    Returns
    -------
    image : uint8 (size, size)
    spots : float64 (n, 2) of (y, x) pixel positions (integers in [2, size-3])
    """
    sim = simulate_components(rng, recipe, n_spots, size)
    return sim.image, sim.spots


def make_target(image, spots):
    """Training target e(X): a copy of ``image`` with the 3x3 STAMP centred at each spot.

    ``spots`` is (n, 2) of (y, x); positions are rounded; stamps are clipped at the
    borders; where stamps overlap the larger value is kept (every centre is 255).
    Returns uint8 (the image is clipped to [0, 255] first if it is not uint8).
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    out = img.copy() if img.dtype == np.uint8 else np.clip(np.rint(img), 0, 255).astype(np.uint8)
    pts = np.asarray(spots, dtype=np.float64).reshape(-1, 2)
    if pts.size == 0:
        return out
    if not np.all(np.isfinite(pts)):
        raise ValueError("spots must be finite (y, x) positions")
    yx = np.rint(pts).astype(np.int64)
    h, w = out.shape
    dy, dx = np.mgrid[-1:2, -1:2]
    vals = STAMP.ravel()
    order = np.argsort(vals, kind="stable")  # write 200s, then 230s, then 255s: max wins
    ys = yx[:, 0][None, :] + dy.ravel()[order][:, None]  # (9, n)
    xs = yx[:, 1][None, :] + dx.ravel()[order][:, None]
    vv = np.broadcast_to(vals[order][:, None], ys.shape)
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[ok], xs[ok]] = vv[ok]  # boolean mask keeps the (value-sorted) order
    return out


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------
def _atomic_write_bytes(path, data: bytes):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _spots_csv_bytes(spots):
    pts = np.asarray(spots, dtype=np.float64).reshape(-1, 2)
    buf = io.StringIO()
    buf.write("y,x\n")
    for y, x in pts:  # formatting only; a few hundred lines
        buf.write(f"{_fmt(y)},{_fmt(x)}\n")
    return buf.getvalue().encode("ascii")


def _fmt(v):
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def write_spots_csv(path, spots):
    """Write (y, x) spots as CSV with header ``y,x`` (atomically)."""
    _atomic_write_bytes(path, _spots_csv_bytes(spots))


def read_spots_csv(path):
    """Read a spots CSV into float (n, 2) (y, x).

    Accepts a header naming the columns (``y,x`` or ``x,y``, in any order); a file
    without a header is taken to be in the authors' ``x,y`` order.
    """
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        return np.zeros((0, 2))
    head = [c.strip().lower() for c in rows[0]]
    try:
        float(head[0])
        has_header = False
    except ValueError:
        has_header = True
    if has_header:
        if "y" not in head or "x" not in head:
            raise ValueError(f"{path}: CSV header must name columns 'y' and 'x', got {rows[0]}")
        iy, ix = head.index("y"), head.index("x")
        body = rows[1:]
    else:
        ix, iy = 0, 1
        body = rows
    if not body:
        return np.zeros((0, 2))
    arr = np.array([[float(r[iy]), float(r[ix])] for r in body], dtype=np.float64)
    return arr


def _encode_png(a):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _encode_tif(a):
    import tifffile
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(a), photometric="minisblack", metadata=None)
    return buf.getvalue()


def simulate_dataset(out_dir, n_images, recipe="code", n_spots=None, seed=0, size=256,
                     image_format="tif"):
    """Write ``n_images`` simulated images with their targets and ground truth.

    Layout: ``out_dir/images/NNNN.tif`` (uint8; or ``.png`` with
    ``image_format="png"``), ``out_dir/targets/NNNN.png`` (e(X), uint8) and
    ``out_dir/csv/NNNN.csv`` (header ``y,x``, 0-based row/column; the authors'
    script wrote ``x,y`` without a header), plus ``out_dir/dataset.json``.
    Every file is written to a temporary file and moved into place with
    ``os.replace``.  Image ``k`` is drawn from ``SeedSequence(seed).spawn(n)[k]``,
    so the same seed gives byte-identical files (and image k does not depend
    on ``n_images``).  ``n_spots`` is an int or an inclusive ``(lo, hi)`` range
    drawn per image.  Returns the list of image paths.
    """
    recipe = _check_recipe(recipe)
    size = _check_size(size)
    _check_n_images(n_images)
    if n_spots is None:
        n_spots = _DEFAULT_N_SPOTS[recipe]
    _check_n_spots(n_spots, size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if image_format not in ("tif", "png"):
        raise ValueError(f"image_format must be 'tif' or 'png', got {image_format!r}")
    n_images = int(n_images)
    width = max(4, len(str(n_images - 1)))
    dirs = {k: os.path.join(out_dir, k) for k in ("images", "targets", "csv")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    children = np.random.SeedSequence(int(seed)).spawn(n_images)
    enc = _encode_tif if image_format == "tif" else _encode_png
    paths = []
    for k, child in enumerate(children):
        rng = np.random.default_rng(child)
        spec = tuple(n_spots) if isinstance(n_spots, (list, tuple)) else n_spots
        image, spots = simulate_image(rng, recipe, spec, size)
        target = make_target(image, spots)
        name = f"{k:0{width}d}"
        ip = os.path.join(dirs["images"], f"{name}.{image_format}")
        _atomic_write_bytes(ip, enc(image))
        _atomic_write_bytes(os.path.join(dirs["targets"], f"{name}.png"), _encode_png(target))
        _atomic_write_bytes(os.path.join(dirs["csv"], f"{name}.csv"), _spots_csv_bytes(spots))
        paths.append(ip)
    meta = dict(recipe=recipe, n_images=n_images, n_spots=list(n_spots) if isinstance(
        n_spots, (list, tuple)) else int(n_spots), seed=int(seed), size=size,
        image_format=image_format, csv_columns="y,x (0-based row, column; the authors' files were x,y)",
        target_stamp=STAMP.tolist())
    _atomic_write_bytes(os.path.join(out_dir, "dataset.json"),
                        (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return paths


# --------------------------------------------------------------------------
# the paper's test sets
# --------------------------------------------------------------------------
_PAPER_FAMILIES = (("DS_fixed", "ds_fixed"), ("DS_var", "ds_var"))
_PAPER_COUNTS = tuple(range(10, 101, 10))


def paper_test_set_names():
    """['DS_fixed_10', ..., 'DS_fixed_100', 'DS_var_10', ..., 'DS_var_100']."""
    return [f"{fam}_{i}" for fam, _ in _PAPER_FAMILIES for i in _PAPER_COUNTS]


def paper_test_sets(seed=0, n_images=40, size=256, names=None) -> Iterator[tuple]:
    """Yield ``(name, images, spots)`` for the paper's DS_fixed^i / DS_var^i test sets.

    i = 10, 20, ..., 100 spots per image; the paper used 40 test images per set.
    ``images`` is uint8 (n_images, size, size); ``spots`` a list of (n, 2) (y, x)
    arrays.  Each set has its own seed stream (``SeedSequence([seed, family, i])``)
    so one set can be regenerated alone (``names=["DS_var_50"]``) and gives the
    same images as in the full sweep.  Sets are generated lazily.
    """
    _check_n_images(n_images)
    size = _check_size(size)
    all_names = paper_test_set_names()
    wanted = all_names if names is None else list(names)
    bad = [n for n in wanted if n not in all_names]
    if bad:
        raise ValueError(f"unknown test set names {bad}; expected names from {all_names}")
    for fi, (fam, recipe) in enumerate(_PAPER_FAMILIES):
        for i in _PAPER_COUNTS:
            name = f"{fam}_{i}"
            if name not in wanted:
                continue
            children = np.random.SeedSequence([int(seed), fi, i]).spawn(int(n_images))
            images = np.empty((int(n_images), size, size), dtype=np.uint8)
            spots = []
            for k, child in enumerate(children):
                images[k], s = simulate_image(np.random.default_rng(child), recipe, i, size)
                spots.append(s)
            yield name, images, spots
