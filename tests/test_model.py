"""The whole network and the Model API: float64 reference, parity with the original TensorFlow
model (golden outputs made by tools/make_golden.py), tiling equal to a whole-image pass, stacks,
dtypes, cancellation, the GIL released, and clear errors for bad input."""
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import reference as ref
from deepspot_napari import Cancelled, Model, bundled_weights_path

GOLDEN = Path(__file__).parent / "data" / "golden_tf.npz"


@pytest.fixture(scope="module")
def model():
    return Model.load("hybrid")  # the published weights: the golden TensorFlow outputs are theirs


@pytest.fixture(scope="module")
def params():
    from safetensors.numpy import load_file  # test-only cross-check of our writer/reader pair
    return load_file(str(bundled_weights_path("hybrid")))


def test_bundled_model_has_the_published_size(model):
    assert model.num_parameters == 4_037_249


def test_network_matches_float64_reference(model, params, rng):
    x = rng.random((2, 40, 24, 1)).astype(np.float32)
    got = model.forward(x)
    expected = ref.deepspot_forward(x.astype(np.float64), params)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-5


def test_stages_chained_equal_the_whole_network(model, rng):
    x = rng.random((1, 64, 48, 1)).astype(np.float32)
    features = model.forward(x, 0, 0)
    assert features.shape == (1, 8, 6, 384)
    trunk = model.forward(features, 1, 1)
    assert trunk.shape == (1, 8, 6, 128)
    staged = model.forward(trunk, 2, 2)
    assert np.array_equal(staged, model.forward(x))


def golden_cases():
    data = np.load(GOLDEN)
    return [(str(data["names"][i]), data[f"input_{i}"], data[f"output_{i}"][0, ..., 0])
            for i in range(len(data["names"]))]


@pytest.mark.parametrize("name,image,expected", golden_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_parity_with_the_original_tensorflow_model(model, name, image, expected):
    got = model.enhance(image)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-4, name


def test_golden_set_covers_simulated_and_real_images():
    names = [n for n, _, _ in golden_cases()]
    assert len(names) >= 8
    assert any("authors_sim" in n for n in names) and any("unannotated" in n for n in names)


def test_tiled_2048_image_equals_the_whole_image_pass(model):
    """No seams: every window carries its stage's receptive field as a halo. Equal up to float32
    rounding (1e-7 measured): oneDNN sums in another order for another window size."""
    rng = np.random.default_rng(7)
    image = rng.poisson(100, (2048, 2048)).astype(np.uint16)
    ys, xs = rng.integers(0, 2048, (2, 400))
    image[ys, xs] += 800
    tiled = model.enhance(image, tile_size=256)
    whole = model.enhance(image, tile_size=None)
    interior = (slice(8, -8), slice(8, -8))
    assert np.max(np.abs(tiled[interior] - whole[interior])) <= 1e-6
    assert np.max(np.abs(tiled - whole)) <= 1e-6


def test_region_equals_the_whole_plane_pass(model, rng):
    """enhance_region: only the stages' needed parts, same pixels as enhance(plane) (float32 rounding);
    regions inside, at every edge, unaligned to the 8 px grid, of an odd-sized plane."""
    plane = (rng.random((523, 610)) * 1000).astype(np.uint16)
    whole = model.enhance(plane, tile_size=None)
    for _ in range(6):
        r0, c0 = int(rng.integers(0, 500)), int(rng.integers(0, 590))
        r1, c1 = int(rng.integers(r0 + 1, 524)), int(rng.integers(c0 + 1, 611))
        np.testing.assert_allclose(model.enhance_region(plane, (r0, r1), (c0, c1)), whole[r0:r1, c0:c1], atol=2e-6)
    np.testing.assert_allclose(model.enhance_region(plane, (0, 523), (0, 610)), whole, atol=2e-6)
    with pytest.raises(ValueError, match="inside the plane"):
        model.enhance_region(plane, (10, 10), (0, 5))
    with pytest.raises(ValueError, match="inside the plane"):
        model.enhance_region(plane, (0, 524), (0, 5))
    with pytest.raises(ValueError, match="one 2D plane"):
        model.enhance_region(plane[None], (0, 5), (0, 5))
    with pytest.raises(Cancelled):
        model.enhance_region(plane, (0, 5), (0, 5), cancel=lambda: True)


def test_odd_sizes_and_small_images(model, rng):
    for shape in [(300, 277), (31, 45), (1, 9)]:
        image = rng.random(shape).astype(np.float32) + 0.1
        out = model.enhance(image, tile_size=128)
        assert out.shape == shape and out.dtype == np.float32
        assert np.all((out >= 0) & (out <= 1))


def test_dtypes_give_the_same_result_after_scaling(model, rng):
    base = rng.integers(1, 250, (64, 72))
    reference_out = model.enhance(base.astype(np.float32))
    for dtype in (np.uint8, np.uint16, np.int32, np.int64, np.float64, np.float16):
        out = model.enhance(base.astype(dtype))
        assert np.max(np.abs(out - reference_out)) <= 1e-6, dtype


def test_stack_is_enhanced_plane_by_plane(model, rng):
    stack = rng.integers(0, 1000, (2, 3, 40, 48)).astype(np.uint16)
    out = model.enhance(stack)
    assert out.shape == stack.shape
    assert np.array_equal(out[1, 2], model.enhance(stack[1, 2]))


def test_progress_reports_and_cancel_stops(model, rng):
    image = rng.random((512, 512)).astype(np.float32)
    seen = []
    model.enhance(image, tile_size=256, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    calls = []
    with pytest.raises(Cancelled):
        model.enhance(image, tile_size=256, cancel=lambda: calls.append(1) or len(calls) >= 2)
    assert len(calls) == 2


def test_gil_is_released_while_the_network_runs(model, rng):
    image = rng.random((512, 512)).astype(np.float32)
    model.enhance(image, tile_size=None)  # build the plan first
    ticks, running = [0], threading.Event()

    def count():
        while not running.is_set():
            pass
        while running.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    running.set()
    before = ticks[0]
    model.forward(image[None, :, :, None])
    during = ticks[0] - before
    running.clear()
    counter.join()
    assert during > 1000


@pytest.mark.parametrize("bad,error,message", [
    (np.full((32, 32), np.nan, np.float32), ValueError, "NaN or Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "NaN or Inf"),
    (np.zeros((32, 32), np.uint8), ValueError, "maximum"),
    (np.full((32, 32), 7, np.uint16), ValueError, "constant"),
    (np.zeros((0, 32), np.float32), ValueError, "empty"),
    (np.arange(10.0), ValueError, "dimension"),
    (np.float32(3.0), ValueError, "dimension"),
    (np.ones((8, 8), np.complex64), TypeError, "dtype"),
    (np.ones((8, 8), bool), TypeError, "dtype"),
    (np.ones((64, 64, 3), np.uint8), ValueError, "RGB"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, "dtype"),
])
def test_bad_images_raise_clear_errors(model, bad, error, message):
    with pytest.raises(error, match=message):
        model.enhance(bad)


def test_bad_enhance_arguments(model):
    image = np.ones((16, 16), np.float32)
    image[3, 3] = 2
    with pytest.raises(ValueError, match="tile_size"):
        model.enhance(image, tile_size=100)
    with pytest.raises(ValueError, match="batch_size"):
        model.enhance(image, batch_size=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.forward(np.ones((1, 12, 16, 1), np.float32))
    with pytest.raises(ValueError, match="channels"):
        model.forward(np.ones((1, 16, 16, 2), np.float32))
    with pytest.raises(ValueError, match="device"):
        Model.load(device="tpu")


def test_windowed_2048_enhancement_runs_in_bounded_memory(tmp_path):
    """Peak memory of a fresh process enhancing a 2048x2048 image in 256 px windows stays under
    1 GiB (a whole-image pass needs about 2.7 GiB): the activations are bounded by the window."""
    import os
    import subprocess
    import sys
    import deepspot_napari
    # The peak is read from VmHWM after resetting it: a child started by subprocess can inherit the
    # test process's own high-water mark through vfork, which ru_maxrss would report.
    script = ("import re, numpy as np\n"
              "from deepspot_napari import Model\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              "image = np.random.default_rng(0).random((2048, 2048)).astype(np.float32)\n"
              "Model.load().enhance(image, tile_size=256)\n"
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(deepspot_napari.__file__).parent.parent)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            check=True)
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak {peak_kib / 1024:.0f} MiB"


def _weights_with_metadata(path, **metadata):
    """The bundled weights saved again with extra safetensors metadata."""
    from deepspot_napari.train import _save_weights
    _save_weights(Model.load("hybrid").make_trainer(), path, False, metadata)
    return path


def test_bundled_models_load_by_name_and_the_missing_one_says_where_it_looked():
    from deepspot_napari.model import BUNDLED_MODELS, bundled_models
    assert Model.load("hybrid").path == bundled_weights_path("hybrid")
    assert Model.load().path == bundled_weights_path("general") == bundled_weights_path()  # the default
    assert {"general", "hybrid"} <= set(bundled_models()) and set(bundled_models()) <= set(BUNDLED_MODELS)
    for name in set(BUNDLED_MODELS) - set(bundled_models()):
        with pytest.raises(FileNotFoundError, match="not found next to the package"):
            Model.load(name)


def test_a_model_carries_its_detection_defaults_and_its_target(tmp_path, rng):
    from deepspot_napari.detect import DEFAULT_DETECTION, detect_spots
    plain = Model.load("hybrid")
    assert plain.detection == DEFAULT_DETECTION and plain.target_background is None
    path = _weights_with_metadata(tmp_path / "own.safetensors", detection='{"threshold": 0.6, "scales": [1]}',
                                  target_background="0.5")
    own = Model.load(path)
    assert own.detection.threshold == 0.6 and own.detection.scales == (1,) and own.target_background == 0.5
    assert own.detection.method == DEFAULT_DETECTION.method  # fields not given keep the defaults
    image = rng.uniform(0, 50, (64, 64)).astype(np.float32)
    image[20, 30] = image[40, 12] = 255
    enhanced = own.enhance(image)
    assert np.array_equal(own.detect(image).coords, detect_spots(enhanced, params=own.detection).coords)
    bad = Model.load(_weights_with_metadata(tmp_path / "bad.safetensors", detection='{"thresh": 1}'))
    with pytest.raises(ValueError, match="detection metadata is not valid"):
        bad.detection


def test_detect_takes_any_stack_one_z_stack_per_leading_index(model, rng):
    """(T, Z, Y, X): each time point's z-stack on its own, the time index as the first column; the
    2D and z-stack results are what they were."""
    from deepspot_napari.simulate import simulate_image
    planes = np.stack([simulate_image(rng, "ds_var", 5, 64)[0] for _ in range(4)]).reshape(2, 2, 64, 64)
    spots = model.detect(planes)
    assert spots.coords.shape[1] == 4 and spots.axes == ("axis0", "z", "y", "x")
    for t in range(2):
        alone = model.detect(planes[t])
        assert alone.coords.shape[1] == 3 and alone.axes == ()
        assert np.array_equal(spots.coords[spots.coords[:, 0] == t, 1:], alone.coords)
    series = model.detect(planes[0], stack="planes")  # (T, Y, X): every plane on its own
    assert np.array_equal(series.coords[series.coords[:, 0] == 1, 1:], model.detect(planes[0, 1]).coords)
    with pytest.raises(ValueError, match="stack must be one of"):
        model.detect(planes, stack="volume")


def test_cached_models_are_shared_and_never_fine_tuned_in_place(tmp_path):
    """One model per weights file, device and precision, for the widgets, batches and Dask workers."""
    first = Model.cached(device="cpu")
    assert Model.cached("general", device="cpu") is first and first.shared and not Model.load(device="cpu").shared
    with pytest.raises(ValueError, match="shared"):
        first.fit([np.ones((64, 64))], [np.zeros((0, 2))])
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(bundled_weights_path(), copy)
    own = Model.cached(copy, device="cpu")
    assert own is not first and Model.cached(str(copy), device="cpu") is own
    os.utime(copy, ns=(1, 1))  # the file changed: loaded again
    assert Model.cached(copy, device="cpu") is not own
