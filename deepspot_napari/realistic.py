"""The realistic simulation recipe: spots like smFISH's on backgrounds like real cells' and tissue's,
imaged by a camera (NumPy/SciPy only, like simulate.py).

Why: the paper's recipes (simulate.py) put bright spots on a smooth Perlin background; on real
images (structured cells, tissue texture, autofluorescent granules, camera offsets, SNR down to 2-3)
a model trained on them drops the faint spots. This recipe draws every one of those properties, each
from the range below, so that a model trained on it and a benchmark scored on it see what users see.

One image (``realistic_image``):

1. a background *level map* in [0, 1] of one kind (``BACKGROUND_KINDS``):
   ``cells`` (soft-edged, boundary-deformed ellipses with textured cytoplasm and a darker or brighter
   nucleus, dark between cells), ``tissue`` (thresholded multi-scale fractal texture), ``paper`` (the
   authors' deformed Perlin background), ``flat`` (uniform: pure camera noise) and ``real`` (a crop of
   a real image with its spots removed, ``background_without_spots``; only when sources are given);
2. optional, each at random: an illumination gradient, out-of-focus haze (large blurred blobs),
   autofluorescent granules and blobs larger than a spot (sigma >= 3 px), bright cell outlines
   (membranes) and thin curved filaments (1-3 px wide lines), and a fine speckle at spot scale
   (cytoplasm granularity, fainter than most spots). None of them is a spot or annotated: real
   images are full of such structure, and a model that never saw it takes it for faint spots;
3. photons = dark + (bright - dark) * level, the dark level and the bright/dark contrast log-uniform;
4. spots: elliptical Gaussians (sigma, axis ratio, angle), subpixel centres, peak amplitude
   ``SNR * local noise std`` where the local noise std is that of the background at the centre
   (Poisson photon noise and the camera's read noise: ``sqrt(photons + (read / gain)^2)``, in
   photons), SNR log-uniform; counts from none to crowded, with clusters and touching pairs; half of
   the spots follow the background (inside cells), half anywhere;
5. the camera: Poisson photons, gain, offset, Gaussian read noise, and an 8-, 12- or 16-bit range
   (8-bit images are exported with a contrast stretch, as microscopy software saves them); in some
   images the noise is spatially correlated (resampled, binned or denoised exports: the real images
   here have a lag-1 noise correlation of 0.25-0.45, ``noise_correlation``) and in some the columns carry a fixed offset each
   (sCMOS column pattern, the vertical stripes of real images).

Ground truth: (n, 2) float (y, x) centres in pixels, 0-based. Training targets are made by the trainer
(train.make_training_pair), as for any annotated image.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .simulate import (MIN_SIZE, _BORDER, _as_rng, _atomic_write_bytes, _background, _check_n_images,
                       _check_n_spots, _check_size, _encode_tif, _rescale, _spots_csv_bytes, fractal_noise,
                       perlin_noise)

__all__ = ["BACKGROUND_KINDS", "SNR_RANGE", "SIGMA_RANGE", "RealisticImage", "realistic_image",
           "realistic_dataset", "background_without_spots", "background_sources", "split_source", "measured_snr",
           "noise_correlation"]

# ---- the recipe's ranges, and why ---------------------------------------------------------------------
# SNR: peak amplitude over the local background noise std; 2 is at the edge of what an expert marks,
# 30 is a bright smFISH spot. Log-uniform, so that faint spots are as common as bright ones.
SNR_RANGE = (2.0, 30.0)
# PSF sigma in pixels: diffraction-limited spots at 65-200 nm pixels, and slightly out-of-focus ones.
SIGMA_RANGE = (0.8, 2.5)
AXIS_RATIO = (1.0, 1.3)                # long over short axis: slight astigmatism / motion
# spots per 1000 px^2, log-uniform: 256x256 holds 6 (sparse) to 390 (crowded, ~13 px apart)
DENSITY = (0.1, 6.0)
P_NO_SPOTS = 0.08                      # images without any spot (the detector must stay silent)
P_CLUSTERED = 0.25                     # images where part of the spots gather in clusters
CLUSTER_FRACTION = (0.2, 0.6)          # ... this fraction of them
CLUSTER_RADIUS = (3.0, 10.0)           # ... around 1-6 centres, Gaussian spread of this radius (px)
P_PAIR = 0.1                           # a spot gets a touching partner 2.5-5 px away
PAIR_DISTANCE = (2.5, 5.0)
# background photons: the darkest part 2-60 photons per pixel (dim widefield to bright confocal), the
# brightest part 1.5-30 times that (unstained gaps to bright cytoplasm or tissue)
DARK_PHOTONS = (2.0, 60.0)
CONTRAST = (1.5, 30.0)
# camera: gain in ADU per photon, offset in ADU, read noise in ADU (sCMOS and CCD)
GAIN = (0.5, 4.0)
OFFSET = (0.0, 600.0)
READ_NOISE = (1.0, 4.0)
BIT_DEPTHS = (8, 12, 16)
BIT_DEPTH_P = (0.3, 0.2, 0.5)
# the kinds of background, and how often each is drawn (real ones only when sources are given)
BACKGROUND_KINDS = ("cells", "tissue", "paper", "flat", "real")
KIND_P = {"cells": 0.3, "tissue": 0.2, "paper": 0.1, "flat": 0.05, "real": 0.35}
# extras: probability, then ranges
P_GRADIENT, GRADIENT_DEPTH = 0.5, (0.2, 0.7)      # illumination falls to (1 - depth) across the image
P_HAZE, HAZE_SIGMA, HAZE_LEVEL = 0.4, (10.0, 40.0), (0.1, 0.6)
P_GRANULES, GRANULE_DENSITY, GRANULE_SIGMA, GRANULE_SNR = 0.35, (0.05, 1.0), (3.0, 6.0), (3.0, 30.0)
P_BLOBS, BLOB_COUNT, BLOB_SIGMA, BLOB_LEVEL = 0.25, (1, 6), (6.0, 20.0), (0.2, 1.0)
# outlines and filaments: line width (Gaussian sigma across the line, px) and peak over the local noise std
# (outlines: of some cells only, and broken into arcs, as membranes show in real images)
P_MEMBRANES, P_FILAMENTS, LINE_SIGMA, LINE_SNR = 0.5, 0.25, (0.6, 1.5), (1.5, 6.0)
P_CELL_OUTLINED = 0.6
# speckle: smoothed white noise (sigma px) whose std is this many local noise stds, inside structure
P_SPECKLE, SPECKLE_SIGMA, SPECKLE_LEVEL = 0.4, (0.8, 2.0), (0.3, 1.2)
# correlated noise: the noise smoothed with a Gaussian of this sigma (px), its variance kept; measured lag-1
# correlation 0.05 (sigma 0.4) to 0.7 (sigma 1.0), around the real images' 0.25-0.45 (noise_correlation)
P_CORRELATED_NOISE, NOISE_CORRELATION = 0.4, (0.4, 1.0)
# column pattern: each column's offset drawn with this std, in units of the image's median noise std
P_COLUMN_NOISE, COLUMN_NOISE = 0.3, (0.1, 0.5)
CELL_RADIUS = (15.0, 60.0)             # cell semi-axes (px)
NUCLEUS_FRACTION = (0.3, 0.6)          # nucleus size relative to its cell
NUCLEUS_LEVEL = (0.2, 1.8)             # nucleus brightness relative to the cytoplasm


def _log_uniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


# ---- backgrounds ------------------------------------------------------------------------------------
def background_without_spots(image, spot_size=7):
    """A real image's background with its spots taken out (float64): a grey opening with a square
    larger than a spot removes every bright feature smaller than the square (spots, noise peaks)
    and keeps cells, nuclei, tissue texture and gradients; a 1 px Gaussian blur smooths the
    opening's flat steps."""
    img = _checked_background(image)
    return ndi.gaussian_filter(ndi.grey_opening(img, size=(spot_size, spot_size)), 1.0)


def _checked_background(image):
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < MIN_SIZE:
        raise ValueError(f"a background must be a 2D image with sides >= {MIN_SIZE}, got shape {img.shape}")
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError("a background image must be finite (no NaN or Inf)")
    return img


def _level(bg):
    """A background scaled to [0, 1] between its 1st and 99.5th percentiles."""
    lo, hi = np.percentile(bg, (1.0, 99.5))
    return np.clip((bg - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def split_source(image, part):
    """The part of a real background image kept for one use, so that training, validation and test
    never share pixels: "train" the left half, "validation" the top-right quarter, "test" the
    bottom-right quarter."""
    h, w = np.asarray(image).shape[:2]
    if part == "train":
        return image[:, : w // 2]
    if part == "validation":
        return image[: h // 2, w // 2:]
    if part == "test":
        return image[h // 2:, w // 2:]
    raise ValueError(f"part must be 'train', 'validation' or 'test', got {part!r}")


def background_sources(images, part=None):
    """Spot-free level maps in [0, 1] of real images (2D arrays), for realistic_image's "real" kind;
    part: None (the whole image) or a split_source part."""
    out = []
    for image in images:
        img = _checked_background(image)
        if part is not None:
            img = split_source(img, part)
        out.append(_level(background_without_spots(img)))
    return out


def _cells(rng, size):
    """The cells' level map, and their outlines (lines of peak 1 along some cells' edges, in arcs)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n = int(rng.integers(1, max(2, int(size * size / 3000)) + 1))
    level = np.zeros((size, size), np.float32)
    outline = np.zeros((size, size), np.float32)
    line_sigma = rng.uniform(*LINE_SIGMA)
    texture = _rescale(fractal_noise(rng, (size, size), (max(size / 32, 1),) * 2, 4, 0.5), 1.0)
    wobble = perlin_noise(rng, (size, size), (max(size / 64, 1),) * 2)
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        a, b = rng.uniform(*CELL_RADIUS, 2)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2) * (1 + 0.15 * wobble)
        edge = rng.uniform(0.05, 0.2)
        cell = 1 / (1 + np.exp(np.clip((d - 1) / edge, -30, 30)))
        f = rng.uniform(*NUCLEUS_FRACTION)
        nucleus = 1 / (1 + np.exp(np.clip((d / f - 1) / 0.1, -30, 30)))
        brightness = rng.uniform(0.3, 1.0) * (1 - 0.5 * rng.random() * (1 - texture))
        inside = brightness * (1 + (rng.uniform(*NUCLEUS_LEVEL) - 1) * nucleus)
        level = np.maximum(level, cell * inside)
        if rng.random() < P_CELL_OUTLINED:
            outline = np.maximum(outline, np.exp(-0.5 * ((d - 1) * np.sqrt(a * b) / line_sigma) ** 2))
    arcs = np.clip(0.5 + 2 * perlin_noise(rng, (size, size), (max(size / 48, 1),) * 2), 0, 1)
    return level, outline * arcs


def _filaments(rng, size):
    """Thin curved lines of peak 1: where a smooth random field crosses a level (its width kept
    constant by dividing by the field's gradient)."""
    field_ = perlin_noise(rng, (size, size), (max(size / rng.uniform(24, 96), 1),) * 2)
    gy, gx = np.gradient(field_)
    distance = (field_ - rng.uniform(-0.2, 0.2)) / np.maximum(np.hypot(gy, gx), 1e-6)
    return np.exp(-0.5 * (distance / rng.uniform(*LINE_SIGMA)) ** 2)


def _tissue(rng, size):
    coarse = fractal_noise(rng, (size, size), (rng.choice([2, 4, 8]) * size / 256,) * 2, 5, 0.6)
    fine = fractal_noise(rng, (size, size), (rng.choice([16, 32]) * size / 256,) * 2, 3, 0.5)
    c = (coarse - coarse.mean()) / max(float(coarse.std()), 1e-6)
    structure = 1 / (1 + np.exp(-rng.uniform(1, 4) * (c - rng.uniform(-1, 1))))
    return structure * (0.7 + 0.3 * _rescale(fine, 1.0))


def _real(rng, size, sources):
    src = sources[int(rng.integers(len(sources)))]
    if min(src.shape) < size:
        raise ValueError(f"a real background source of shape {src.shape} is smaller than the {size} px image")
    y0, x0 = int(rng.integers(0, src.shape[0] - size + 1)), int(rng.integers(0, src.shape[1] - size + 1))
    crop = np.rot90(src[y0:y0 + size, x0:x0 + size], int(rng.integers(4)))
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _gaussian_blobs(shape, centres, sigmas, amplitudes):
    """Sum of isotropic Gaussians (peak = amplitude) on a float64 canvas."""
    out = np.zeros(shape)
    for (y, x), s, a in zip(centres, sigmas, amplitudes):
        half = int(np.ceil(3 * s))
        y0, y1 = max(int(y) - half, 0), min(int(y) + half + 2, shape[0])
        x0, x1 = max(int(x) - half, 0), min(int(x) + half + 2, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        gy = np.exp(-0.5 * ((np.arange(y0, y1) - y) / s) ** 2)
        gx = np.exp(-0.5 * ((np.arange(x0, x1) - x) / s) ** 2)
        out[y0:y1, x0:x1] += a * np.outer(gy, gx)
    return out


# ---- spots ------------------------------------------------------------------------------------------
_SUPER = 3  # sub-samples per pixel side: pixel-integrated elliptical Gaussians


def render_spots(shape, centres, sigma, axis_ratio, angle, amplitude):
    """Elliptical Gaussian spots, integrated over each pixel (3x3 sub-samples), summed (float64).
    sigma is the geometric mean of the two axes' sigmas; amplitude is each continuous peak."""
    n = len(centres)
    out = np.zeros(shape)
    if n == 0:
        return out
    half = int(np.ceil(3.5 * float(np.max(sigma * np.sqrt(axis_ratio)))))
    side = 2 * half + 1
    base = np.floor(centres).astype(np.int64) - half                           # (n, 2) patch corners
    sub = (np.arange(side * _SUPER) + 0.5) / _SUPER - 0.5                       # sub-sample offsets
    py = base[:, :1] + sub[None, :] - centres[:, :1]                            # (n, S) y - cy
    px = base[:, 1:] + sub[None, :] - centres[:, 1:]
    s_long, s_short = sigma * np.sqrt(axis_ratio), sigma / np.sqrt(axis_ratio)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    dy, dx = py[:, :, None], px[:, None, :]
    u, v = dx * c + dy * s, -dx * s + dy * c
    g = np.exp(-0.5 * ((u / s_long[:, None, None]) ** 2 + (v / s_short[:, None, None]) ** 2))
    g = g.reshape(n, side, _SUPER, side, _SUPER).mean(axis=(2, 4)) * amplitude[:, None, None]
    ys = base[:, 0][:, None, None] + np.arange(side)[None, :, None]
    xs = base[:, 1][:, None, None] + np.arange(side)[None, None, :]
    ys, xs = np.broadcast_to(ys, g.shape), np.broadcast_to(xs, g.shape)
    ok = (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
    np.add.at(out, (ys[ok], xs[ok]), g[ok])
    return out


def _spot_count(rng, size, n_spots):
    if n_spots is not None:
        lo, hi = _check_n_spots(n_spots, size)
        return int(rng.integers(lo, hi + 1))
    if rng.random() < P_NO_SPOTS:
        return 0
    return int(round(_log_uniform(rng, *DENSITY) * size * size / 1000))


def _positions(rng, size, n, level):
    """Exactly n subpixel centres: half following the background level, half uniform; some in
    clusters, some in touching pairs; all inside [_BORDER, size - 1 - _BORDER]."""
    if n == 0:
        return np.zeros((0, 2))
    w = (level + 1e-3).ravel()
    flat = rng.choice(size * size, size=n, p=w / w.sum())
    pos = np.stack([flat // size, flat % size], axis=1) + rng.uniform(-0.5, 0.5, (n, 2))
    anywhere = rng.random(n) < 0.5
    pos[anywhere] = rng.uniform(0, size - 1, (int(anywhere.sum()), 2))
    if rng.random() < P_CLUSTERED:
        k = int(round(rng.uniform(*CLUSTER_FRACTION) * n))
        centres = pos[rng.integers(0, n, int(rng.integers(1, 7)))]
        pick = rng.choice(n, size=k, replace=False)
        pos[pick] = centres[rng.integers(0, len(centres), k)] + rng.normal(0, 1, (k, 2)) * rng.uniform(*CLUSTER_RADIUS)
    # touching pairs: an odd-numbered spot moves next to the even one before it (the count stays n)
    movers = np.flatnonzero((rng.random(n) < P_PAIR) & (np.arange(n) % 2 == 1))
    if len(movers):
        d = rng.uniform(*PAIR_DISTANCE, len(movers))
        t = rng.uniform(0, 2 * np.pi, len(movers))
        pos[movers] = pos[movers - 1] + np.stack([d * np.sin(t), d * np.cos(t)], axis=1)
    return np.clip(pos, _BORDER, size - 1 - _BORDER)


# ---- the camera -------------------------------------------------------------------------------------
def _camera(rng, photons, gain, offset, read, bits, correlation=0.0, column=0.0):
    """ADU counts of a photon image in the given bit depth (uint8 or uint16; what saturates clips).
    correlation: the noise (shot and read) smoothed with a Gaussian of this sigma in px, scaled back
    to its own variance, so that each pixel's noise std is unchanged (0: white noise); column: each
    column's offset drawn with this std, in units of the median pixel noise std (0: none).
    8 bits: the image is saved with a contrast stretch from a little below its darkest pixel to a
    little above its brightest (what most acquisition software exports)."""
    noise = gain * (rng.poisson(photons) - photons) + rng.normal(0.0, read, photons.shape)
    if correlation > 0:
        impulse = np.zeros((15, 15))
        impulse[7, 7] = 1.0
        noise_kept = np.sqrt(np.sum(ndi.gaussian_filter(impulse, correlation) ** 2))
        noise = ndi.gaussian_filter(noise, correlation) / noise_kept
    counts = offset + gain * photons + noise
    if column > 0:
        typical = float(np.median(np.sqrt(gain ** 2 * photons + read ** 2)))
        counts = counts + rng.normal(0.0, column * typical, (1, photons.shape[1]))
    if bits == 8:
        lo = float(counts.min()) * rng.uniform(0.0, 1.0)
        hi = float(counts.max()) * rng.uniform(1.0, 1.25)
        return np.clip(np.rint((counts - lo) * 255.0 / max(hi - lo, 1e-9)), 0, 255).astype(np.uint8)
    return np.clip(np.rint(counts), 0, 2 ** bits - 1).astype(np.uint16)


@dataclass
class RealisticImage:
    image: np.ndarray                  # uint8 or uint16 (size, size)
    spots: np.ndarray                  # (n, 2) float (y, x)
    snr: np.ndarray                    # (n,) each spot's SNR
    sigma: np.ndarray                  # (n,) each spot's sigma (geometric mean of its axes), px
    photons: np.ndarray                # float64 background photons (no spots, no noise)
    noise_std: np.ndarray              # (n,) the background noise std at each centre, photons
    params: dict = field(default_factory=dict)


def realistic_image(rng, size=256, *, sources=(), kinds=None, n_spots=None, snr=SNR_RANGE,
                    sigma=SIGMA_RANGE) -> RealisticImage:
    """One image of the realistic recipe (module docstring). sources: level maps for the "real"
    kind (background_sources); kinds: the background kinds to draw from (default: all, "real" only
    with sources), with KIND_P's weights; n_spots: None (the recipe's density, none to crowded),
    an int or an inclusive (lo, hi); snr, sigma: (lo, hi) ranges (SNR log-uniform; lo == hi fixes it)."""
    rng = _as_rng(rng)
    size = _check_size(size)
    if kinds is None:
        kinds = tuple(k for k in BACKGROUND_KINDS if k != "real" or len(sources))
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in BACKGROUND_KINDS]
    if bad or not kinds:
        raise ValueError(f"background kinds must be among {BACKGROUND_KINDS}, got {kinds!r}")
    if "real" in kinds and not len(sources):
        raise ValueError("the 'real' background kind needs real background sources")
    if not (0 < snr[0] <= snr[1]) or not (0 < sigma[0] <= sigma[1]):
        raise ValueError(f"snr and sigma must be positive (lo, hi) ranges, got {snr!r}, {sigma!r}")
    p = np.array([KIND_P[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]

    outline = None
    if kind == "cells":
        level, outline = _cells(rng, size)
    elif kind == "tissue":
        level = _tissue(rng, size)
    elif kind == "paper":
        bg = _background(rng, size, "poisson")[0]
        level = bg / max(float(bg.max()), 1e-12)
    elif kind == "flat":
        level = np.zeros((size, size))
    else:
        level = _real(rng, size, sources)
    level = np.asarray(level, np.float64)
    extras = []
    if kind != "flat":
        if rng.random() < P_GRADIENT:
            t = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
            ramp = (yy * np.sin(t) + xx * np.cos(t)) + 0.5
            level = level * (1 - rng.uniform(*GRADIENT_DEPTH) * np.clip(ramp, 0, 1))
            extras.append("gradient")
        if rng.random() < P_HAZE:
            haze = ndi.gaussian_filter(rng.random((size, size)) ** 8, rng.uniform(*HAZE_SIGMA))
            level = level + rng.uniform(*HAZE_LEVEL) * haze / max(float(haze.max()), 1e-12)
            extras.append("haze")
    dark = _log_uniform(rng, *DARK_PHOTONS)
    bright = dark * _log_uniform(rng, *CONTRAST)
    photons = dark + (bright - dark) * level
    if kind != "flat":
        if rng.random() < P_BLOBS:
            k = int(rng.integers(BLOB_COUNT[0], BLOB_COUNT[1] + 1))
            photons = photons + _gaussian_blobs(photons.shape, rng.uniform(0, size, (k, 2)),
                                                rng.uniform(*BLOB_SIGMA, k), rng.uniform(*BLOB_LEVEL, k) * (bright - dark))
            extras.append("blobs")
        if rng.random() < P_GRANULES:
            k = int(round(rng.uniform(*GRANULE_DENSITY) * size * size / 1000))
            centres = rng.uniform(0, size, (k, 2))
            local = photons[np.clip(centres[:, 0].astype(int), 0, size - 1), np.clip(centres[:, 1].astype(int), 0, size - 1)]
            photons = photons + _gaussian_blobs(photons.shape, centres, rng.uniform(*GRANULE_SIGMA, k),
                                                _log_uniform(rng, *GRANULE_SNR, k) * np.sqrt(local))
            extras.append("granules")
        lines = np.zeros_like(photons)
        if outline is not None and rng.random() < P_MEMBRANES:
            lines = np.maximum(lines, outline)
            extras.append("membranes")
        if rng.random() < P_FILAMENTS:
            lines = np.maximum(lines, _filaments(rng, size) * (level > np.median(level)))
            extras.append("filaments")
        if lines.any():
            photons = photons + rng.uniform(*LINE_SNR) * np.sqrt(photons) * lines
        if rng.random() < P_SPECKLE:
            speckle = ndi.gaussian_filter(rng.standard_normal(photons.shape), rng.uniform(*SPECKLE_SIGMA))
            speckle *= rng.uniform(*SPECKLE_LEVEL) / max(float(speckle.std()), 1e-12)
            photons = np.maximum(photons + speckle * np.sqrt(photons) * np.clip(level, 0, 1), 0.0)
            extras.append("speckle")

    bits = int(rng.choice(BIT_DEPTHS, p=BIT_DEPTH_P))
    gain, offset, read = rng.uniform(*GAIN), rng.uniform(*OFFSET), rng.uniform(*READ_NOISE)
    correlation = rng.uniform(*NOISE_CORRELATION) if rng.random() < P_CORRELATED_NOISE else 0.0
    column = rng.uniform(*COLUMN_NOISE) if rng.random() < P_COLUMN_NOISE else 0.0
    if correlation > 0:
        extras.append("correlated_noise")
    if column > 0:
        extras.append("column_noise")
    if bits in (12, 16):  # the exposure an operator would set: the brightest background and spot fit the range
        top = float(photons.max()) + snr[1] * np.sqrt(float(photons.max()) + read ** 2) + 100
        gain = min(gain, 0.9 * (2 ** bits - 1 - offset) / top)
    n = _spot_count(rng, size, n_spots)
    pos = _positions(rng, size, n, level)
    n = len(pos)
    spot_snr = _log_uniform(rng, *snr, n) if snr[0] < snr[1] else np.full(n, float(snr[0]))
    spot_sigma = rng.uniform(*sigma, n)
    ratio, angle = rng.uniform(*AXIS_RATIO, n), rng.uniform(0, np.pi, n)
    iy, ix = np.rint(pos).astype(np.int64).T if n else (np.zeros(0, int), np.zeros(0, int))
    noise_std = np.sqrt(photons[iy, ix] + (read / gain) ** 2)
    signal = photons + render_spots(photons.shape, pos, spot_sigma, ratio, angle, spot_snr * noise_std)
    image = _camera(rng, signal, gain, offset, read, bits, correlation, column)
    order = np.lexsort((pos[:, 1], pos[:, 0])) if n else np.zeros(0, int)
    params = dict(recipe="realistic", kind=kind, extras=extras, bits=bits, gain=float(gain), offset=float(offset),
                  read_noise=float(read), dark_photons=float(dark), bright_photons=float(bright), n_spots=int(n),
                  size=size)
    return RealisticImage(image=image, spots=pos[order], snr=spot_snr[order], sigma=spot_sigma[order],
                          photons=photons, noise_std=noise_std[order], params=params)


def realistic_dataset(out_dir, n_images, seed=0, size=256, *, sources=(), kinds=None, n_spots=None,
                      snr=SNR_RANGE, sigma=SIGMA_RANGE, description=None):
    """Writes n_images of the realistic recipe: images/NNNN.tif (uint8 or uint16), csv/NNNN.csv
    (y,x subpixel centres), dataset.json (the recipe's settings and each image's parameters).
    Image k is realistic_image(SeedSequence(seed).spawn(n)[k], ...). Returns the image paths."""
    size = _check_size(size)
    _check_n_images(n_images)
    dirs = {k: os.path.join(out_dir, k) for k in ("images", "csv")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    width, paths, per_image = max(4, len(str(n_images - 1))), [], []
    for k, child in enumerate(np.random.SeedSequence(int(seed)).spawn(int(n_images))):
        sim = realistic_image(np.random.default_rng(child), size, sources=sources, kinds=kinds, n_spots=n_spots,
                              snr=snr, sigma=sigma)
        name = f"{k:0{width}d}"
        paths.append(os.path.join(dirs["images"], f"{name}.tif"))
        _atomic_write_bytes(paths[-1], _encode_tif(sim.image))
        _atomic_write_bytes(os.path.join(dirs["csv"], f"{name}.csv"), _spots_csv_bytes(sim.spots))
        per_image.append(dict(name=name, **sim.params))
    meta = dict(kind="realistic", description=description, n_images=int(n_images), seed=int(seed), size=size,
                kinds=list(kinds) if kinds is not None else None, n_real_sources=len(sources),
                n_spots=n_spots if n_spots is None or np.isscalar(n_spots) else list(n_spots),
                snr=list(snr), sigma=list(sigma), images=per_image)
    _atomic_write_bytes(os.path.join(out_dir, "dataset.json"), json.dumps(meta, indent=1).encode())
    return paths


def measured_snr(image, spots, inner=4.0, outer=8.0):
    """Each spot's SNR as measured on an image, the same way for real and simulated ones: the
    brightest pixel of its 3x3 neighbourhood above the median of the annulus inner..outer px around
    it, over the annulus' standard deviation (an underestimate where the annulus holds other spots
    or structure). Spots whose annulus leaves the image are NaN."""
    img = np.asarray(image, np.float64)
    pts = np.asarray(spots, np.float64).reshape(-1, 2)
    r = int(np.ceil(outer))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    ring = (np.hypot(dy, dx) >= inner) & (np.hypot(dy, dx) <= outer)
    peak = ndi.maximum_filter(img, 3)
    out = np.full(len(pts), np.nan)
    for k, (y, x) in enumerate(np.rint(pts).astype(int)):
        if r <= y < img.shape[0] - r and r <= x < img.shape[1] - r:
            values = img[y - r:y + r + 1, x - r:x + r + 1][ring]
            out[k] = (peak[y, x] - np.median(values)) / max(float(values.std()), 1e-9)
    return out


def noise_correlation(image, scale=3.0):
    """The lag-1 correlation of an image's noise, the same way for real and simulated ones: the
    image minus a Gaussian blur of `scale` px (cells, gradients and most of each spot go), then the
    correlation of neighbouring pixels of that residual, averaged over rows and columns, over the
    pixels within 2.5 robust standard deviations (so that spots and bright structure count little).
    About 0 for white camera noise; 0.25-0.45 on the real images here."""
    img = np.asarray(image, np.float64)
    residual = img - ndi.gaussian_filter(img, scale)
    residual -= np.median(residual)
    spread = 1.4826 * float(np.median(np.abs(residual)))
    if spread == 0:
        return 0.0
    quiet = np.abs(residual) < 2.5 * spread
    pairs = [(residual[:, 1:], residual[:, :-1], quiet[:, 1:] & quiet[:, :-1]),
             (residual[1:], residual[:-1], quiet[1:] & quiet[:-1])]
    return float(np.mean([np.mean(a[m] * b[m]) / np.sqrt(np.mean(a[m] ** 2) * np.mean(b[m] ** 2))
                          for a, b, m in pairs]))
