"""Spot detection (csrc/detect.c through deepspot_napari.detect): the a trous transform and the Icy
wavelet detector against float64 NumPy references, subpixel accuracy on simulated Gaussian spots
(fresh random each run, seed printed), the peak detector's rules, input checks, z-stack merging."""
import numpy as np
import pytest
from scipy import ndimage

from deepspot_napari import _core
from deepspot_napari.detect import DEFAULT_DETECTION, Spots, detect_spots
from deepspot_napari.errors import Cancelled

B3 = np.array([1, 4, 6, 4, 1]) / 16


def reference_details(image, num_scales, mode="symmetric"):
    """W_1..W_n in float64: separable B3 kernel with 2^(k-1)-1 holes, np.pad borders."""
    approx = image.astype(np.float64)
    details = []
    for scale in range(1, num_scales + 1):
        step = 2 ** (scale - 1)
        smoothed = approx
        for axis in (0, 1):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (2 * step, 2 * step)
            padded = np.pad(smoothed, pad, mode=mode)
            n = smoothed.shape[axis]
            smoothed = sum(w * padded.take(np.arange(i * step, i * step + n), axis=axis) for i, w in enumerate(B3))
        details.append(approx - smoothed)
        approx = smoothed
    return np.stack(details)


def reference_wavelet_spots(image, scales, sensitivities):
    """Icy's detector in float64 NumPy: (y, x) centroids of the 8-connected components, the
    smallest margin |W - thr| / thr over enabled scales, and the component sizes."""
    details = reference_details(image, max(scales))
    n = image.size
    keep = np.ones(image.shape, bool)
    margin = np.inf
    for scale, sensitivity in zip(scales, sensitivities):
        w = details[scale - 1]
        threshold = np.sqrt(2 * np.log(n / 4.0**scale)) * np.mean(np.abs(w - w.mean())) * 100 / sensitivity
        keep &= (w >= threshold) & (w > 0)
        margin = min(margin, np.min(np.abs(w - threshold)) / threshold)
    labels, count = ndimage.label(keep, structure=np.ones((3, 3)))
    centroids = np.array(ndimage.center_of_mass(keep, labels, range(1, count + 1))).reshape(-1, 2)
    sizes = ndimage.sum(keep, labels, range(1, count + 1))
    return centroids, np.asarray(sizes), margin


def gaussian_spots_image(rng, shape, spacing, sigma_range, amplitude, noise_sd, background=0.2):
    """Isolated Gaussian spots on a grid with random subpixel offsets; returns image, true (y, x)."""
    ys, xs = np.meshgrid(np.arange(spacing, shape[0] - spacing + 1, spacing),
                         np.arange(spacing, shape[1] - spacing + 1, spacing), indexing="ij")
    truth = np.stack([ys.ravel(), xs.ravel()], axis=1) + rng.uniform(-0.5, 0.5, (ys.size, 2))
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = np.full(shape, background) + rng.normal(0, noise_sd, shape)
    for (y, x), sigma in zip(truth, rng.uniform(*sigma_range, len(truth))):
        image += amplitude * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    return image.astype(np.float32), truth


def match_errors(found, truth, max_distance=1.0):
    """Distance from each true spot to its nearest detection; asserts a one-to-one pairing."""
    distances = np.linalg.norm(truth[:, None, :] - found[None, :, :], axis=2)
    assert len(found) == len(truth), f"{len(found)} spots found for {len(truth)} true ones"
    nearest = distances.argmin(axis=1)
    assert len(set(nearest.tolist())) == len(truth), "two true spots share a detection"
    errors = distances.min(axis=1)
    assert errors.max() < max_distance
    return errors


# ---------------------------------------------------------------- wavelet transform and detector

@pytest.mark.parametrize("shape,num_scales", [((17, 19), 3), ((33, 40), 4), ((65, 67), 5), ((70, 129), 5),
                                              ((101, 37), 3), ((9, 9), 1)])
def test_wavelet_transform_matches_reference(rng, shape, num_scales):
    image = rng.random(shape).astype(np.float32) * rng.uniform(0.5, 100)
    got = _core.wavelet_transform(image, num_scales)
    expected = reference_details(image, num_scales)
    assert got.shape == (num_scales, *shape) and got.dtype == np.float32
    assert np.max(np.abs(got - expected)) <= 2e-6 * np.max(np.abs(image))
    # the borders are the edge-repeating mirror (Icy's), not NumPy's 'reflect'
    assert not np.allclose(got, reference_details(image, num_scales, mode="reflect"), atol=1e-3 * image.max())


@pytest.mark.parametrize("scales,sensitivities", [((2,), (100,)), ((1, 2), (80, 100)), ((2, 3), (100, 60)),
                                                  ((3,), (150,))])
def test_wavelet_detector_matches_reference(rng, scales, sensitivities):
    for _ in range(20):  # redraw the rare image with a coefficient within rounding of a threshold
        image, _ = gaussian_spots_image(rng, (90, 111), 15, (1.0, 2.0), 1.0, 0.1)
        expected, sizes, margin = reference_wavelet_spots(image, scales, sensitivities)
        if margin > 1e-4:
            break
    got = _core.detect_wavelet(image, None, list(scales), list(sensitivities), "none")
    assert len(got) == len(expected) > 0
    order = np.lexsort((expected[:, 1], expected[:, 0]))
    got_order = np.lexsort((got[:, 2], got[:, 1]))
    np.testing.assert_allclose(got[got_order][:, 1:3], expected[order], atol=1e-3)
    np.testing.assert_array_equal(got[got_order][:, 5], sizes[order])


@pytest.mark.parametrize("method", ["peak", "wavelet"])
@pytest.mark.parametrize("subpixel", ["centroid", "gaussian"])
def test_isolated_spots_are_localised(rng, method, subpixel):
    amplitude, background = 1.0, 0.2
    options = dict(method=method, subpixel=subpixel, threshold=background + amplitude / 2, min_distance=5,
                   scales=(2,), sensitivities=(100,))
    # SNR (amplitude / noise sd) 10: the mean error is what noise allows (about 0.1 px for a fit)
    image, truth = gaussian_spots_image(rng, (160, 176), 16, (1.0, 2.0), amplitude, amplitude / 10, background)
    errors = match_errors(detect_spots(image, **options).coords, truth)
    assert errors.mean() < 0.2, errors
    # SNR 40: every spot within 0.2 px
    image, truth = gaussian_spots_image(rng, (160, 176), 16, (1.0, 2.0), amplitude, amplitude / 40, background)
    errors = match_errors(detect_spots(image, **options).coords, truth)
    assert errors.max() < 0.2, errors


def test_wavelet_spots_carry_size_score_and_raw_intensity():
    image = np.zeros((40, 50), np.float32)
    image[10:13, 20:23] = [[0.8, 0.9, 0.8], [0.9, 1.0, 0.9], [0.8, 0.9, 0.8]]
    raw = np.arange(image.size, dtype=np.float32).reshape(image.shape)
    spots = detect_spots(image, raw, method="wavelet", scales=(1,), sensitivities=(100,), subpixel="none")
    assert len(spots) == 1
    np.testing.assert_allclose(spots.coords, [[11, 21]])
    assert spots.score[0] == pytest.approx(1.0)
    assert spots.intensity[0] == raw[11, 21]
    assert spots.size[0] >= 1


# ---------------------------------------------------------------- peak detector

def peaks_image():
    image = np.zeros((32, 40), np.float32)
    for (y, x), value in {(10, 10): 1.0, (10, 13): 0.9, (20, 20): 0.8, (20, 22): 0.95, (28, 5): 0.3}.items():
        image[y, x] = value
    return image


@pytest.mark.parametrize("min_distance,expected", [
    (0, [(10, 10), (20, 22), (10, 13), (20, 20)]),
    (2, [(10, 10), (20, 22), (10, 13)]),  # (20, 20) is 2 px from a stronger peak: inclusive
    (3, [(10, 10), (20, 22)]),
    (2.9, [(10, 10), (20, 22), (10, 13)]),
])
def test_peak_min_distance_keeps_the_strongest(min_distance, expected):
    spots = detect_spots(peaks_image(), method="peak", threshold=0.5, min_distance=min_distance, subpixel="none")
    np.testing.assert_array_equal(spots.coords, np.array(expected, float))  # strongest first
    assert np.all(np.diff(spots.score) <= 0)


def test_peak_threshold_is_strict_and_flat_tops_give_one_peak():
    image = peaks_image()
    assert len(detect_spots(image, threshold=0.95, min_distance=0, subpixel="none")) == 1  # 0.95 itself is out
    flat = np.zeros((20, 20), np.float32)
    flat[5:8, 5:8] = 1.0  # saturated 3x3 stamp
    spots = detect_spots(flat, threshold=0.5, min_distance=0, subpixel="none")
    np.testing.assert_array_equal(spots.coords, [[5, 5]])  # first in raster order
    spots = detect_spots(flat, threshold=0.5, min_distance=0, subpixel="centroid")
    np.testing.assert_allclose(spots.coords, [[6, 6]])
    assert spots.size[0] == 9  # half-maximum area


def test_peak_footprint_radius():
    image = np.zeros((20, 20), np.float32)
    image[5, 5], image[5, 8] = 1.0, 0.9
    assert len(detect_spots(image, threshold=0.5, min_distance=0, footprint_radius=1)) == 2
    assert len(detect_spots(image, threshold=0.5, min_distance=0, footprint_radius=3)) == 1


# ---------------------------------------------------------------- inputs

@pytest.mark.parametrize("kwargs,message", [
    (dict(method="wavelet", scales=(0,)), "scale must be in 1..5"),
    (dict(method="wavelet", scales=(6,)), "scale must be in 1..5"),
    (dict(method="wavelet", scales=(2,), sensitivities=(0,)), "positive"),
    (dict(method="wavelet", scales=(2,), sensitivities=(-5,)), "positive"),
    (dict(method="wavelet", scales=(2, 2), sensitivities=(100,)), "twice"),
    (dict(method="wavelet", scales=(1, 2), sensitivities=(100, 100, 100)), "same length"),
    (dict(method="wavelet", scales=(4,)), "needs both sides >= 33"),
    (dict(method="nope"), "method"),
    (dict(subpixel="parabola"), "subpixel"),
    (dict(window_radius=0), "window_radius"),
    (dict(window_radius=16), "window_radius"),
    (dict(footprint_radius=0), "footprint_radius"),
    (dict(min_distance=-1), "min_distance"),
    (dict(threshold=float("nan")), "threshold"),
])
def test_bad_parameters_raise(kwargs, message):
    image = np.zeros((24, 30), np.float32)
    with pytest.raises(ValueError, match=message):
        detect_spots(image, **kwargs)


def test_bad_images_raise():
    good = np.zeros((40, 40), np.float32)
    for bad, error, message in [
        (np.zeros(40, np.float32), ValueError, "2D"),
        (np.zeros((0, 40), np.float32), ValueError, "empty"),
        (np.zeros((40, 40), bool), TypeError, "real numbers"),
        (np.zeros((40, 40), complex), TypeError, "real numbers"),
        (np.full((40, 40), None), TypeError, "real numbers"),
    ]:
        with pytest.raises(error, match=message):
            detect_spots(bad)
    for method in ("peak", "wavelet"):
        image = good.copy()
        image[3, 7] = np.nan
        with pytest.raises(ValueError, match="row 3, column 7"):
            detect_spots(image, method=method)
        raw = good.copy()
        raw[5, 1] = np.inf
        with pytest.raises(ValueError, match="raw image .* row 5, column 1"):
            detect_spots(good, raw, method=method)
    stack = np.zeros((3, 40, 40), np.float32)
    stack[2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="plane 2"):
        detect_spots(stack)
    with pytest.raises(ValueError, match="shape"):
        detect_spots(good, np.zeros((40, 41), np.float32))
    with pytest.raises(TypeError, match="integers"):
        detect_spots(good, method="wavelet", scales=(2.5,))


def test_integer_images_and_views_are_accepted():
    image = np.zeros((30, 60), np.uint16)
    image[10, 20] = 1000
    spots = detect_spots(image[:, ::2], threshold=500, subpixel="none")  # non-contiguous view
    np.testing.assert_array_equal(spots.coords, [[10, 10]])
    assert spots.score[0] == 1000


# ---------------------------------------------------------------- z-stacks

def stamp(stack, z, y, x, value):
    stack[z, y - 1:y + 2, x - 1:x + 2] = value / 2
    stack[z, y, x] = value


def test_stack_merges_a_molecule_across_adjacent_planes():
    stack = np.zeros((5, 64, 64), np.float32)
    for z, value in ((1, 0.6), (2, 1.0), (3, 0.7)):
        stamp(stack, z, 20, 20, value)  # one molecule over planes 1..3, brightest at 2
    stamp(stack, 3, 20, 26, 0.8)  # a neighbour 6 px away in plane 3
    stamp(stack, 0, 40, 40, 0.9)
    stamp(stack, 4, 40, 40, 0.9)  # same (y, x) but not in adjacent planes: two molecules
    spots = detect_spots(stack, threshold=0.4, subpixel="none", merge_radius=2)
    table = sorted(map(tuple, spots.coords.tolist()))
    assert table == [(0, 40, 40), (2, 20, 20), (3, 20, 26), (4, 40, 40)]
    merged = spots.coords.tolist().index([2, 20, 20])
    assert spots.score[merged] == pytest.approx(1.0)
    assert spots.size[merged] == pytest.approx(3 * spots.size[spots.coords.tolist().index([3, 20, 26])])
    assert set(spots.as_table()) == {"z", "y", "x", "score", "intensity", "size"}


def test_merge_links_closest_pairs_one_to_one():
    def row(z, y, x, score):
        return [z, y, x, score, score, 1]

    spots = np.array([row(0, 10, 10, 0.5), row(0, 10, 11.5, 0.6), row(1, 10, 11, 0.9), row(2, 10, 11.2, 0.4)],
                     np.float32)
    merged = _core.merge_plane_spots(spots, 2.0)
    # plane 1's spot links to the closer of plane 0's (x = 11.5), plane 2's to it; x = 10 stays alone
    np.testing.assert_allclose(merged, [row(0, 10, 10, 0.5), [1, 10, 11, 0.9, 0.9, 3]])
    assert len(_core.merge_plane_spots(spots[:0], 2.0)) == 0
    with pytest.raises(ValueError, match="plane index"):
        _core.merge_plane_spots(np.array([row(0.5, 1, 1, 1)], np.float32), 2.0)
    with pytest.raises(ValueError, match="radius"):
        _core.merge_plane_spots(spots, -1.0)


def test_result_table_and_csv(tmp_path):
    spots = detect_spots(peaks_image(), threshold=0.5, min_distance=0, subpixel="none")
    assert isinstance(spots, Spots) and len(spots) == 4 and spots.coords.shape == (4, 2)
    path = tmp_path / "spots.csv"
    spots.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "y,x,score,intensity,size" and len(lines) == 5
    assert [float(v) for v in lines[1].split(",")[:3]] == [10, 10, 1.0]
    assert DEFAULT_DETECTION.method in ("peak", "wavelet")


def _spotted_planes(rng, shape):
    """Float images of `shape` (..., 48, 48): faint noise with a few bright 3x3 spots per plane."""
    images = rng.uniform(0, 0.1, shape).astype(np.float32)
    for index in np.ndindex(*shape[:-2]):
        for y, x in rng.integers(4, 44, (3, 2)):
            images[index + (slice(y - 1, y + 2), slice(x - 1, x + 2))] = 0.8
            images[index + (y, x)] = 1.0
    return images


def test_a_larger_stack_is_detected_one_z_stack_or_one_plane_at_a_time(rng):
    """(T, Z, Y, X): each time point's z-stack on its own, its index in a leading column; "planes":
    each (y, x) plane on its own. Raw intensities follow their plane."""
    stack = _spotted_planes(rng, (2, 3, 48, 48))
    raw = stack * 100
    spots = detect_spots(stack, raw)
    assert spots.coords.shape[1] == 4 and spots.axes == ("axis0", "z", "y", "x")
    assert list(spots.as_table())[:4] == ["axis0", "z", "y", "x"]
    for t in range(2):
        alone = detect_spots(stack[t], raw[t])
        mine = spots.coords[:, 0] == t
        assert np.array_equal(spots.coords[mine, 1:], alone.coords)
        assert np.array_equal(spots.intensity[mine], alone.intensity)
    planes = detect_spots(stack, raw, stack="planes")
    assert planes.axes == ("axis0", "axis1", "y", "x")
    for t, z in np.ndindex(2, 3):
        mine = (planes.coords[:, 0] == t) & (planes.coords[:, 1] == z)
        assert np.array_equal(planes.coords[mine, 2:], detect_spots(stack[t, z]).coords)
    series = detect_spots(stack[0], stack="planes")  # (T, Y, X): no merging across time points
    assert series.axes == ("axis0", "y", "x") and len(series) == sum(len(detect_spots(p)) for p in stack[0])
    assert detect_spots(stack[0]).axes == () and detect_spots(stack[0]).coords.shape[1] == 3  # z-stack: as before


def test_a_larger_stack_checks_its_input_and_can_be_cancelled(rng):
    stack = _spotted_planes(rng, (2, 2, 48, 48))
    with pytest.raises(ValueError, match="stack must be one of"):
        detect_spots(stack, stack="volume")
    with pytest.raises(ValueError, match="must match"):
        detect_spots(stack, raw=stack[0])
    broken = stack.copy()
    broken[1, 0, 5, 6] = np.nan
    with pytest.raises(ValueError, match=r"stack index \(1,\): plane 0: .*row 5, column 6"):
        detect_spots(broken)
    with pytest.raises(Cancelled):
        detect_spots(stack, cancel=lambda: True)
