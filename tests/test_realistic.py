"""Tests of the realistic simulation recipe (deepspot_napari.realistic): its statistics stay within
the ranges it declares, its parts (spot removal, source splits, camera) do what they say."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from deepspot_napari import realistic as R


def test_background_without_spots_removes_a_spot_and_keeps_the_gradient():
    yy, xx = np.mgrid[0:96, 0:96].astype(float)
    gradient = 500 + 3 * yy + 2 * xx
    with_spot = gradient + 400 * np.exp(-((yy - 40) ** 2 + (xx - 50) ** 2) / (2 * 1.5 ** 2))
    cleaned = R.background_without_spots(with_spot)
    assert np.abs(cleaned - gradient)[8:-8, 8:-8].max() < 0.05 * 400
    with pytest.raises(ValueError, match="2D image with sides"):
        R.background_without_spots(np.ones((10, 10)))
    with pytest.raises(ValueError, match="finite"):
        R.background_without_spots(np.full((40, 40), np.nan))


def test_source_parts_never_share_pixels():
    image = np.arange(64 * 80, dtype=float).reshape(64, 80)
    parts = {p: set(R.split_source(image, p).ravel().tolist()) for p in ("train", "validation", "test")}
    assert parts["train"].isdisjoint(parts["validation"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["validation"].isdisjoint(parts["test"])
    assert sum(map(len, parts.values())) == image.size
    with pytest.raises(ValueError, match="part must be"):
        R.split_source(image, "all")


def _many(n, size=96, **kw):
    rng = np.random.default_rng(np.random.SeedSequence(7))
    sources = R.background_sources([ndi.gaussian_filter(rng.random((200, 200)), 8) * 1000 + 100])
    return [R.realistic_image(np.random.default_rng(s), size, sources=sources, **kw)
            for s in np.random.SeedSequence(11).spawn(n)]


def test_recipe_statistics_stay_in_their_declared_ranges():
    sims = _many(80)
    snr = np.concatenate([s.snr for s in sims])
    sigma = np.concatenate([s.sigma for s in sims])
    assert snr.min() >= R.SNR_RANGE[0] and snr.max() <= R.SNR_RANGE[1]
    assert sigma.min() >= R.SIGMA_RANGE[0] and sigma.max() <= R.SIGMA_RANGE[1]
    # log-uniform: as many spots below the geometric mean of the range as above it
    assert 0.4 < np.mean(snr < np.sqrt(np.prod(R.SNR_RANGE))) < 0.6
    kinds = {s.params["kind"] for s in sims}
    assert kinds == set(R.BACKGROUND_KINDS)
    assert {s.image.dtype for s in sims} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert {s.params["bits"] for s in sims} == set(R.BIT_DEPTHS)
    for s in sims:
        n = len(s.spots)
        assert s.image.shape == (96, 96) and n == len(s.snr) == len(s.sigma) == s.params["n_spots"]
        if n:
            assert np.all((s.spots >= 2) & (s.spots <= 93))
        if s.params["bits"] == 12:
            assert s.image.max() <= 4095
        assert n <= R.DENSITY[1] * 96 * 96 / 1000 + 1  # density: at most the declared maximum
    assert any(len(s.spots) == 0 for s in sims)  # images without spots are part of the recipe
    counts = [len(s.spots) for s in _many(10, kinds=("cells",), n_spots=(7, 9))]
    assert min(counts) >= 7 and max(counts) <= 9  # a count asked for is exact


def test_spot_snr_is_peak_amplitude_over_the_local_noise():
    """On a flat background with a fixed SNR, the measured peak above the background, over the
    background's measured noise std, is the declared SNR (pixel integration lowers the peak a little)."""
    sims = _many(6, size=128, kinds=("flat",), n_spots=(15, 25), snr=(10.0, 10.0), sigma=(1.5, 1.5))
    ratios = []
    for s in sims:
        assert np.allclose(s.snr, 10.0)
        img = s.image.astype(float)
        mask = np.ones(img.shape, bool)
        iy, ix = np.rint(s.spots).astype(int).T
        mask[np.clip(iy, 0, 127), np.clip(ix, 0, 127)] = False
        mask = ndi.binary_erosion(mask, iterations=6)
        background, noise = np.median(img[mask]), img[mask].std()
        peaks = ndi.maximum_filter(img, 3)[iy, ix]
        ratios.append(np.median(peaks - background) / noise)
    # a 1.5 px spot integrated over its centre pixel keeps ~95 % of its peak; the 3x3 maximum of noise adds ~1
    assert 8.5 < np.median(ratios) < 12.5


def test_recipe_is_deterministic_and_checks_its_arguments(tmp_path):
    a, b = _many(3), _many(3)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.spots, y.spots) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="needs real background sources"):
        R.realistic_image(0, 64, kinds=("real",))
    with pytest.raises(ValueError, match="kinds must be among"):
        R.realistic_image(0, 64, kinds=("stars",))
    with pytest.raises(ValueError, match="positive"):
        R.realistic_image(0, 64, snr=(0, 3))
    with pytest.raises(ValueError, match="smaller than"):
        R.realistic_image(0, 128, kinds=("real",), sources=[np.zeros((64, 64))])
    paths = R.realistic_dataset(tmp_path / "d", 3, seed=5, size=64, kinds=("cells", "tissue"))
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert len(paths) == 3 and meta["n_images"] == 3 and {m["kind"] for m in meta["images"]} <= {"cells", "tissue"}
    assert (tmp_path / "d" / "csv" / "0002.csv").read_text().startswith("y,x")


def test_camera_noise_can_be_correlated_or_striped_and_keeps_its_variance():
    photons = np.full((192, 192), 50.0)
    expected_std = np.sqrt(2.0 ** 2 * 50 + 2.0 ** 2)  # gain 2, read noise 2 ADU
    for correlation, lo, hi in ((0.0, -0.1, 0.1), (1.0, 0.55, 0.8)):
        image = R._camera(np.random.default_rng(3), photons, 2.0, 100.0, 2.0, 16, correlation).astype(float)
        assert abs(image.std() / expected_std - 1) < 0.05  # smoothing the noise does not shrink it
        assert lo < R.noise_correlation(image) < hi
    striped = R._camera(np.random.default_rng(4), photons, 2.0, 100.0, 2.0, 16, column=0.5).astype(float)
    column_std = striped.mean(axis=0).std()  # each column's mean: its offset plus noise / sqrt(192)
    assert 0.35 * expected_std < column_std < 0.65 * expected_std
    assert striped.mean(axis=1).std() < 0.15 * expected_std  # rows carry no pattern


def test_structures_that_are_not_spots_are_drawn_and_thin():
    extras = {e for s in _many(80) for e in s.params["extras"]}
    assert {"membranes", "filaments", "speckle", "granules", "blobs", "haze", "gradient", "correlated_noise",
            "column_noise"} <= extras
    lines = R._filaments(np.random.default_rng(5), 256)
    assert 0.95 < lines.max() <= 1.0
    assert np.mean(lines > 0.5) < 0.15  # lines 1-3 px wide, not patches
    level, outline = R._cells(np.random.default_rng(6), 256)
    assert level.shape == outline.shape == (256, 256) and outline.max() <= 1.0
    assert np.mean(outline > 0.5) < 0.15


def test_noise_correlation_is_zero_for_white_noise_and_high_for_smoothed_noise():
    rng = np.random.default_rng(8)
    white = rng.normal(100, 5, (128, 128))
    assert abs(R.noise_correlation(white)) < 0.05
    assert R.noise_correlation(ndi.gaussian_filter(white, 1.0)) > 0.5
    assert R.noise_correlation(np.full((64, 64), 7.0)) == 0.0
