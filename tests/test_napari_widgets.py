"""The napari widgets driven in a real napari viewer, headless, end to end: enhance a 2D image and
a z-stack (plane in view on demand, cached; then all planes), detect (features, editable defaults),
annotate -> train -> enhance with the new model, cancel, bad-layer errors as notifications, the
viewer's event loop kept running during a run, and the plugin loaded through its npe2 manifest.

Needs a display with OpenGL: uses $DISPLAY (e.g. under `xvfb-run -a pytest`), else starts its
own Xvfb for the session (stopped once pytest has exited); skips with a reason when there is neither."""
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install 'deepspot-napari[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from virtual_display import start_xvfb  # noqa: E402


_why_not = start_xvfb("1600x1000x24")
if _why_not:
    pytest.skip(_why_not, allow_module_level=True)

from napari.utils.notifications import notification_manager  # noqa: E402
from qtpy.QtCore import QTimer  # noqa: E402

from deepspot_napari import Model  # noqa: E402
from deepspot_napari._widgets import (DetectWidget, EnhanceWidget, TrainWidget, current_model,  # noqa: E402
                                      training_pairs)
from deepspot_napari.simulate import simulate_image  # noqa: E402

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def model():
    return Model.load(precision="auto")  # the widgets' default precision


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def messages():
    """Notifications shown during the test, as (severity, message)."""
    start = len(notification_manager.records)
    return lambda: [(str(r.severity), r.message) for r in notification_manager.records[start:]]


def errors(messages):
    return [m for severity, m in messages() if severity == "error"]


def wait_task(qtbot, owner, attribute="task"):
    qtbot.waitUntil(lambda: getattr(owner, attribute) is not None and not getattr(owner, attribute).running,
                    timeout=TIMEOUT_MS)
    return getattr(owner, attribute)


def simulated(rng, size=128, n_spots=25):
    image, spots = simulate_image(rng, "code", n_spots=n_spots, size=size)
    return image, np.asarray(spots, float)


def test_enhance_2d_image_adds_then_updates_the_enhanced_layer(viewer, qtbot, rng, model, messages):
    image, _ = simulated(rng)
    viewer.add_image(image, name="cells")
    widget = EnhanceWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.image.value is viewer.layers["cells"]
    assert widget.run_button.text == "Enhance"
    widget.run_button.clicked.emit()
    assert wait_task(qtbot, widget, "all_task").outcome == "done"
    out = viewer.layers["cells enhanced"]
    assert out.data.shape == image.shape and out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, model.enhance(image), atol=1e-5)
    assert out.contrast_limits == [0.0, 1.0]
    # a second click: cached, nothing recomputed; new weights: the same layer is updated, not duplicated
    widget.enhance_all()
    assert any("already enhanced" in m for _, m in messages())
    current_model(viewer).load(None)
    widget.enhance_all()
    assert wait_task(qtbot, widget, "all_task").outcome == "done"
    assert [layer.name for layer in viewer.layers] == ["cells", "cells enhanced"]
    assert errors(messages) == []


def test_zstack_plane_in_view_on_demand_then_all_planes(viewer, qtbot, rng, model, messages):
    stack = np.stack([simulated(rng, 64, 10)[0] for _ in range(3)])
    viewer.add_image(stack, name="stack", scale=(3, 1, 1))
    widget = EnhanceWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.run_button.text == "Enhance all planes"
    viewer.dims.set_current_step(0, 1)  # z step 1 (world z = 3) -> plane 1
    widget.in_view.value = True
    out = viewer.layers["stack enhanced"]
    state = out.metadata["deepspot"]
    # the plane in view, then the next one prefetched while we look
    qtbot.waitUntil(lambda: state["done"] == {(1,), (2,)} and not widget.plane_task.running, timeout=TIMEOUT_MS)
    expected = model.enhance(stack)
    np.testing.assert_allclose(out.data[1:], expected[1:], atol=1e-5)
    assert not out.data[0].any()
    viewer.dims.set_current_step(0, 2)  # a prefetched plane: nothing to do (and no plane after it)
    assert not widget.plane_task.running
    viewer.dims.set_current_step(0, 1)  # back to a cached plane: nothing to do
    assert not widget.plane_task.running and state["done"] == {(1,), (2,)}
    widget.in_view.value = False
    widget.enhance_all()  # only plane 0 is left
    assert wait_task(qtbot, widget, "all_task").outcome == "done"
    assert state["done"] == {(0,), (1,), (2,)}
    np.testing.assert_allclose(out.data, expected, atol=1e-5)
    assert out.scale[0] == 3
    assert errors(messages) == []


def _zoom_to(viewer, box):
    """Camera on the (Y, X) box ((r0, r1), (c0, c1)) of the data, which then fills the canvas."""
    (r0, r1), (c0, c1) = box
    viewer.camera.center = (viewer.camera.center[0], (r0 + r1) / 2, (c0 + c1) / 2)
    height, width = viewer.window._qt_viewer.canvas.size
    viewer.camera.zoom = min(height / (r1 - r0), width / (c1 - c0))


def test_view_first_shows_the_view_then_caches_the_whole_plane(viewer, qtbot, rng, model, monkeypatch):
    stack = np.stack([np.tile(simulated(rng, 128, 30)[0], (3, 3)) for _ in range(2)])  # 2 x 384 x 384
    viewer.add_image(stack, name="big")
    widget = EnhanceWidget(viewer)
    viewer.window.add_dock_widget(widget)
    _zoom_to(viewer, ((140, 240), (150, 250)))
    regions = []
    original = Model.enhance_region

    def spy(self, plane, rows, cols, **kwargs):
        regions.append((rows, cols))
        return original(self, plane, rows, cols, **kwargs)
    monkeypatch.setattr(Model, "enhance_region", spy)
    viewer.dims.set_current_step(0, 0)
    widget.in_view.value = True
    out = viewer.layers["big enhanced"]
    state = out.metadata["deepspot"]
    qtbot.waitUntil(lambda: state["done"] == {(0,), (1,)} and not widget.plane_task.running, timeout=TIMEOUT_MS)
    (r0, r1), (c0, c1) = regions[0]  # the part in view came first (the prefetched plane 1 has no view)
    assert len(regions) == 1 and r0 <= 140 and r1 >= 240 and c0 <= 150 and c1 >= 250 and (r1 - r0) < 300
    # the cached planes are the whole-plane result
    np.testing.assert_allclose(out.data, model.enhance(stack), atol=1e-5)
    # and the part in view alone agrees with it
    part = model.enhance_region(stack[0], (r0, r1), (c0, c1))
    np.testing.assert_allclose(part, out.data[0, r0:r1, c0:c1], atol=1e-5)


def test_leaving_a_plane_cancels_its_work_and_leaves_no_half_filled_plane(viewer, qtbot, rng, model):
    from deepspot_napari.errors import Cancelled
    stack = np.stack([np.tile(simulated(rng, 128, 30)[0], (3, 3)) for _ in range(3)])
    viewer.add_image(stack, name="big")
    widget = EnhanceWidget(viewer)
    viewer.window.add_dock_widget(widget)
    _zoom_to(viewer, ((100, 200), (100, 200)))
    slow = Model.load()  # its whole-plane pass waits until cancelled: the part in view is all it shows

    def enhance(image, *, cancel=None, **kwargs):
        while not cancel():
            time.sleep(0.01)
        raise Cancelled("enhancement cancelled")
    slow.enhance = enhance
    widget.holder.set(slow, "slow")
    viewer.dims.set_current_step(0, 0)
    widget.in_view.value = True
    out = viewer.layers["big enhanced"]
    state = out.metadata["deepspot"]
    qtbot.waitUntil(lambda: out.data[0].any(), timeout=TIMEOUT_MS)  # the part in view is shown
    first = widget.plane_task
    viewer.dims.set_current_step(0, 2)  # moving on cancels plane 0's work ...
    qtbot.waitUntil(lambda: first.outcome == "cancelled", timeout=TIMEOUT_MS)
    assert (0,) not in state["done"] and not out.data[0].any()  # ... and leaves nothing half filled
    qtbot.waitUntil(lambda: out.data[2].any(), timeout=TIMEOUT_MS)  # plane 2's view comes next
    widget.cancel()
    wait_task(qtbot, widget, "plane_task")
    assert state["done"] == set() and not out.data.any()


def test_time_series_of_zstacks_plane_in_view(viewer, qtbot, rng, model):
    series = np.stack([np.stack([simulated(rng, 64, 6)[0] for _ in range(2)]) for _ in range(2)])  # (T, Z, Y, X)
    viewer.add_image(series, name="movie")
    widget = EnhanceWidget(viewer)
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 0)
    widget.in_view.value = True
    wait_task(qtbot, widget, "plane_task")
    out = viewer.layers["movie enhanced"]
    assert out.metadata["deepspot"]["done"] == {(1, 0)}
    np.testing.assert_allclose(out.data[1, 0], model.enhance(series[1, 0]), atol=1e-5)
    widget.enhance_all()
    assert wait_task(qtbot, widget, "all_task").outcome == "done"
    np.testing.assert_allclose(out.data, model.enhance(series), atol=1e-5)


def test_ui_thread_is_not_blocked_while_enhancing(viewer, qtbot, rng):
    stack = np.stack([simulated(rng, 256, 40)[0] for _ in range(3)])
    viewer.add_image(stack, name="big")
    widget = EnhanceWidget(viewer)
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    start = time.perf_counter()
    widget.enhance_all()
    task = widget.all_task
    assert task.running  # enhance_all returned at once, the work goes on in a worker
    wait_task(qtbot, widget, "all_task")
    end = time.perf_counter()
    timer.stop()
    during = [t for t in ticks if start <= t <= end]
    assert task.outcome == "done"
    assert end - start > 0.2
    assert len(during) >= 10, f"only {len(during)} timer ticks in {end - start:.2f} s: the event loop was blocked"
    gaps = np.diff([start] + during + [end])
    assert gaps.max() < 1.0, f"the event loop stalled for {gaps.max():.2f} s"


def test_cancel_stops_a_run(viewer, qtbot, rng, messages):
    stack = np.stack([simulated(rng, 256, 40)[0] for _ in range(8)])
    viewer.add_image(stack, name="long")
    widget = EnhanceWidget(viewer)
    widget.enhance_all()
    assert widget.cancel_button.enabled
    widget.cancel_button.clicked.emit()
    task = wait_task(qtbot, widget, "all_task")
    assert task.outcome == "cancelled"
    assert widget.status.value == "cancelled" and not widget.cancel_button.enabled
    assert len(viewer.layers["long enhanced"].metadata["deepspot"]["done"]) < 8
    assert any("cancelled" in m for _, m in messages()) and errors(messages) == []
    # the progress bar's own cancel (napari's activity dock) stops it too
    widget.enhance_all()
    widget.all_task.pbar.cancel()
    assert wait_task(qtbot, widget, "all_task").outcome == "cancelled"


def test_detect_from_image_and_from_enhanced_layer(viewer, qtbot, rng, model, messages):
    image, truth = simulated(rng, 128, 30)
    viewer.add_image(image, name="field")
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.enhance_first.value  # a raw image: enhance first
    assert widget.params() == model.detection  # the model's own fixed defaults are what the widget shows
    widget.run_button.clicked.emit()
    assert wait_task(qtbot, widget).outcome == "done"
    spots = viewer.layers["field spots"]
    expected = model.detect(image)
    assert len(spots.data) == len(expected) > 10
    np.testing.assert_allclose(spots.data, expected.coords, atol=1e-4)
    assert list(spots.features.columns) == ["score", "intensity", "size"]
    np.testing.assert_allclose(spots.features["score"], expected.score, atol=1e-5)
    np.testing.assert_allclose(spots.features["intensity"], expected.intensity)
    assert np.ptp(spots.size) > 0 and len(np.unique(spots.face_color, axis=0)) > 1  # sized, coloured by score
    assert "field enhanced" in viewer.layers  # enhancing first also shows the enhanced image
    # from the enhanced layer, with an edited threshold; intensities still from the raw image
    widget.image.value = viewer.layers["field enhanced"]
    assert not widget.enhance_first.value
    widget.threshold.value = 0.95
    widget.method.value = "peak"
    widget.detect()
    assert wait_task(qtbot, widget).outcome == "done"
    strict = model.detect(image, method="peak", threshold=0.95)
    assert [layer.name for layer in viewer.layers].count("field spots") == 1
    spots = viewer.layers["field spots"]
    assert len(spots.data) == len(strict) < len(expected)
    np.testing.assert_allclose(spots.features["intensity"], strict.intensity)
    assert spots.metadata["deepspot"]["params"]["threshold"] == pytest.approx(0.95)
    widget.reset_defaults()
    assert widget.params() == model.detection
    widget.table_button.clicked.emit()  # napari's features table of the spots layer
    assert viewer.layers.selection.active is spots
    assert any("Features table" in name for name in viewer.window.dock_widgets)
    assert errors(messages) == []


def test_detect_zstack_and_independent_planes(viewer, qtbot, rng, model):
    stack = np.stack([simulated(rng, 64, 8)[0] for _ in range(3)])
    viewer.add_image(stack, name="zs")
    widget = DetectWidget(viewer)
    assert not widget.stack_mode.native.isHidden()  # shown for stacks only
    widget.detect()
    assert wait_task(qtbot, widget).outcome == "done"
    merged = viewer.layers["zs spots"]
    expected = model.detect(stack)
    assert merged.data.shape == (len(expected), 3)
    widget.stack_mode.value = "independent planes (time series)"
    widget.detect()
    assert wait_task(qtbot, widget).outcome == "done"
    planes = viewer.layers["zs spots"]
    per_plane = sum(len(model.detect(plane)) for plane in stack)
    assert len(planes.data) == per_plane >= len(expected)
    np.testing.assert_array_equal(planes.data[:, 0], np.round(planes.data[:, 0]))


def test_bad_layers_are_notifications_not_crashes(viewer, qtbot, rng, messages):
    enhance, detect, train = EnhanceWidget(viewer), DetectWidget(viewer), TrainWidget(viewer)
    enhance.enhance_all()  # no layer at all
    detect.detect()
    assert len(errors(messages)) == 2 and all("no image layer chosen" in m for m in errors(messages))
    viewer.add_image(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), name="photo", rgb=True)
    enhance.enhance_all()
    assert "RGB" in errors(messages)[-1]
    viewer.layers.remove("photo")
    viewer.add_image(np.zeros((64, 64), np.uint16), name="blank")
    enhance.enhance_all()  # fails in the worker: reported, not raised
    assert wait_task(qtbot, enhance, "all_task").outcome == "failed"
    assert "maximum 0" in errors(messages)[-1]
    # a stack with a blank plane: the others are enhanced, one warning says which plane stays black
    stack = np.stack([simulated(rng, 64, 5)[0], np.zeros((64, 64), np.uint8)])
    viewer.add_image(stack, name="partly blank")
    enhance.image.value = viewer.layers["partly blank"]
    enhance.enhance_all()
    assert wait_task(qtbot, enhance, "all_task").outcome == "done"
    assert any(severity == "warning" and "plane (1,)" in m for severity, m in messages())
    assert viewer.layers["partly blank enhanced"].data[0].max() > 0.5
    detect.image.value = viewer.layers["partly blank enhanced"]
    detect.enhance_first.value = True
    detect.detect()
    assert "already an enhanced layer" in errors(messages)[-1]
    # Train: a Points layer that does not fit its image
    image, truth = simulated(rng, 64, 5)
    viewer.add_image(image, name="img")
    outside = viewer.add_points(truth + [0, 500], name="far away")
    with pytest.raises(Exception, match="outside image 'img'"):
        training_pairs([(viewer.layers["img"], outside)])
    # an area (Shapes) layer: its shapes' bounding rectangles in image pixels, clipped to the image
    inside = viewer.add_points(truth, name="inside")
    area = viewer.add_shapes([np.array([[4.2, 10.0], [40.0, 80.0]])], shape_type="rectangle", name="area")
    images, points, regions = training_pairs([(viewer.layers["img"], inside, area)])
    assert regions == [[(4, 10, 41, 64)]] and len(images) == 1 and len(points[0]) == len(truth)
    assert training_pairs([(viewer.layers["img"], inside)])[2] is None
    with pytest.raises(Exception, match="holds no shape"):
        training_pairs([(viewer.layers["img"], inside, viewer.add_shapes(name="no shapes"))])
    far = viewer.add_shapes([np.array([[200.0, 200.0], [240.0, 240.0]])], shape_type="rectangle", name="far area")
    with pytest.raises(Exception, match="lies outside image 'img'"):
        training_pairs([(viewer.layers["img"], inside, far)])
    viewer.add_points(np.c_[np.zeros(len(truth)), truth], name="3d points")
    train.pairs[0].image.value = viewer.layers["img"]
    train.pairs[0].points.value = viewer.layers["3d points"]
    train.train()
    assert "has 3 dimensions but image 'img' has 2" in errors(messages)[-1]
    train.pairs[0].points.value = outside
    train.train()
    assert "outside image 'img'" in errors(messages)[-1]
    train.pairs[0].points.value = viewer.add_points(np.zeros((0, 2)), name="empty")
    train.train()
    assert "hold no points" in errors(messages)[-1]
    detect.image.value = viewer.layers["img"]
    detect.scales.value = "two"
    detect.method.value = "wavelet"
    detect.detect()
    assert "wavelet scales" in errors(messages)[-1]
    current_model(viewer).device = "auto"
    train.model_panel.weights.value = "/nonexistent/weights.safetensors"
    train.model_panel.load_button.clicked.emit()
    assert "not found" in errors(messages)[-1]
    assert not train.task and viewer.layers  # nothing started, the viewer is alive


def test_one_current_model_shared_by_the_widgets(viewer, tmp_path):
    from deepspot_napari import bundled_weights_path
    enhance, detect, train = EnhanceWidget(viewer), DetectWidget(viewer), TrainWidget(viewer)
    holder = current_model(viewer)
    assert enhance.holder is detect.holder is train.holder is holder
    first = holder.get()
    assert holder.get() is first  # loaded once, not on every click
    copy = tmp_path / "mine.safetensors"
    shutil.copyfile(bundled_weights_path(), copy)
    detect.model_panel.weights.value = str(copy)
    detect.model_panel.load_button.clicked.emit()
    assert holder.get() is not first and holder.path == copy
    for widget in (enhance, detect, train):
        assert widget.model_panel.info.value.startswith("mine.safetensors")
    assert "auto" in enhance.model_panel.device.choices and "cpu" in enhance.model_panel.device.choices
    version = holder.version
    train.model_panel.device.value = "cpu"  # reloads the same weights on that device, for every widget
    assert holder.device == "cpu" and holder.version > version and holder.path == copy
    assert detect.model_panel.device.value == "cpu" and enhance.model_panel.info.value.endswith("on cpu")
    detect.model_panel.bundled_button.clicked.emit()
    assert holder.path is None and enhance.model_panel.info.value.startswith("bundled")
    assert detect.model_panel.bundled.value == "general" and "hybrid" in detect.model_panel.bundled.choices


def test_detect_widget_shows_the_models_own_detection_defaults(viewer, tmp_path):
    from deepspot_napari.train import _save_weights
    default = Model.load().detection  # the default bundled model's
    own = tmp_path / "own.safetensors"
    _save_weights(Model.load("hybrid").make_trainer(), own, False, {"detection": '{"threshold": 0.6}'})
    detect = DetectWidget(viewer)
    assert detect.threshold.value == default.threshold
    detect.model_panel.weights.value = str(own)
    detect.model_panel.load_button.clicked.emit()
    assert detect.threshold.value == 0.6 and detect.params().threshold == 0.6
    detect.threshold.value = 0.7  # an edit stays while the model keeps the same defaults
    current_model(viewer).load(own, device="cpu")
    assert detect.threshold.value == 0.7
    detect.model_panel.bundled_button.clicked.emit()  # the default bundled model: its own defaults again
    assert detect.threshold.value == default.threshold


def test_device_choices_are_the_working_devices(viewer, messages):
    """Without a simulated GPU: "auto" and "cpu" (plus "cuda" only if one works here), the precision menu
    shown only where there is a choice, the resolved device's description as the tooltip, and a setting
    the Model refuses (TF32 on the CPU) reported
    as a notification with the choice put back."""
    from deepspot_napari.devices import probe
    enhance = EnhanceWidget(viewer)
    panel, holder = enhance.model_panel, current_model(viewer)
    gpu_works = probe("cuda")[0]
    assert list(panel.device.choices) == ["auto", "cpu"] + (["cuda"] if gpu_works else [])
    from deepspot_napari.devices import cpu_has_bf16
    # the precision menu shows where there is a choice: TF32 on a GPU, bf16 on a CPU with bf16 instructions
    assert panel.device.value == "auto" and panel.precision.native.isHidden() != (gpu_works or cpu_has_bf16())
    resolved = "cuda" if gpu_works else "cpu"
    assert panel.device.tooltip == f"runs on {resolved}: {probe(resolved)[1]}"
    panel.device.value = "cpu"
    panel.precision.value = "tf32"
    assert "precision tf32: precision 'tf32' needs the GPU backend" in errors(messages)[-1]
    assert (holder.device, holder.precision, panel.precision.value) == ("cpu", "auto", "auto")


def test_device_and_precision_choices_reach_model_load(viewer, model, monkeypatch):
    """With a simulated working GPU: "cuda" is offered in every widget, and the choices go to
    Model.load (through the API's model cache, emptied here) as they are (recorded here; the model
    returned is the CPU one)."""
    from deepspot_napari import _widgets, bundled_weights_path
    from deepspot_napari import model as model_module
    monkeypatch.setattr(_widgets, "available_devices", lambda: [("cpu", "CPU, test"), ("cuda", "Fake GPU")])
    monkeypatch.setattr(model_module, "_CACHE", {})
    monkeypatch.setattr(model, "shared", False)
    loads = []

    def load(path=None, *, device="auto", precision="float32"):
        loads.append((path, device, precision))
        return model

    monkeypatch.setattr(Model, "load", load)
    enhance, detect, train = EnhanceWidget(viewer), DetectWidget(viewer), TrainWidget(viewer)
    for widget in (enhance, detect, train):
        assert list(widget.model_panel.device.choices) == ["auto", "cpu", "cuda"]
        assert not widget.model_panel.precision.native.isHidden()
    holder = current_model(viewer)
    version = holder.version
    detect.model_panel.device.value = "cuda"
    train.model_panel.precision.value = "tf32"
    bundled = bundled_weights_path().resolve()  # the default bundled model
    assert loads == [(bundled, "cuda", "auto"), (bundled, "cuda", "tf32")]
    assert (holder.device, holder.precision) == ("cuda", "tf32") and holder.version == version + 2
    assert enhance.model_panel.device.value == "cuda" and enhance.model_panel.precision.value == "tf32"
    assert holder.copy() is model and loads[-1] == ("general", "cuda", "tf32")  # what Train fine-tunes


def test_loss_plot_draws_a_history(viewer):
    train = TrainWidget(viewer)
    train._show_history([{"loss": 0.9, "val_loss": 1.0, "val_f1": 0.2}, {"loss": 0.5, "val_loss": 0.7, "val_f1": 0.6}])
    train._show_history({"loss": 0.3, "val_loss": 0.5, "val_f1": 0.8})  # one more epoch, as live progress sends it
    assert train.history["loss"] == [0.9, 0.5, 0.3] and train.history["val_f1"][-1] == 0.8
    train.plot.resize(300, 140)
    image = train.plot.grab().toImage()
    colours = {image.pixelColor(x, y).name() for x in range(0, 300, 3) for y in range(0, 140, 3)}
    assert {"#4fc3f7", "#ffb74d", "#81c784"} & colours  # the curves were drawn
    assert "val_f1 0.8" in train.status.value


@pytest.mark.skipif(not hasattr(Model, "fit"), reason="Model.fit (deepspot_napari/train.py) is not available yet")
def test_annotate_train_then_enhance_with_the_new_model(viewer, qtbot, rng, tmp_path, messages):
    image, truth = simulated(rng, 64, 12)
    viewer.add_image(image, name="annotated")
    annotation = viewer.add_points(ndim=2, name="annotated spots")
    for point in truth:  # what a user clicks in add mode, or corrects after Detect
        annotation.add(point)
    train = TrainWidget(viewer)
    enhance = EnhanceWidget(viewer)
    holder = current_model(viewer)
    assert train.pairs[0].points.value is viewer.layers["annotated spots"]
    before = holder.get().enhance(image)
    version = holder.version
    # a cancelled run leaves the current model as it was (a 64 px image is too small to hold out a strip)
    train.epochs.value, train.validation_split.value = 50, 0.0
    train.train()
    qtbot.waitUntil(lambda: train.task.pbar.n >= 1, timeout=TIMEOUT_MS)
    train.cancel_button.clicked.emit()
    assert wait_task(qtbot, train).outcome == "cancelled"
    assert holder.version == version and "unchanged" in train.status.value
    # a real one: a few steps, live history, then the fine-tuned model is everyone's current model
    train.epochs.value, train.batch_size.value = 2, 1
    train.learning_rate.value = "1e-3"
    train.train()
    task = wait_task(qtbot, train)
    assert task.outcome == "done", errors(messages)
    assert train.history["loss"] and len(train.history["loss"]) == 2 and train.history["epoch"] == [1.0, 2.0]
    assert holder.version > version and "fine-tuned" in enhance.model_panel.info.value
    assert "not saved" in enhance.model_panel.info.value
    enhance.enhance_all()
    assert wait_task(qtbot, enhance, "all_task").outcome == "done"
    after = viewer.layers["annotated enhanced"].data
    assert not np.allclose(after, before, atol=1e-4)  # the new weights are the ones used
    train.save_path.value = str(tmp_path / "tuned.safetensors")
    train.save_button.clicked.emit()
    assert (tmp_path / "tuned.safetensors").is_file() and "not saved" not in enhance.model_panel.info.value
    np.testing.assert_allclose(Model.load(tmp_path / "tuned.safetensors", precision="auto").enhance(image), after,
                               atol=1e-5)
    assert errors(messages) == []


def test_plugin_through_its_manifest(make_napari_viewer, npe2pm, tmp_path):
    """npe2 loads the manifest: widgets dock from the Plugins menu, the sample opens, the reader
    and writer are used by File > Open / Save."""
    here = Path(__file__).resolve().parents[1]
    import deepspot_napari
    manifest = Path(deepspot_napari.__file__).parent / "napari.yaml"
    manifest = manifest if manifest.is_file() else here / "napari.yaml"
    with npe2pm.tmp_plugin(manifest=str(manifest)):
        viewer = make_napari_viewer()
        viewer.open_sample("deepspot-napari", "smfish")
        assert [layer.name for layer in viewer.layers] == ["smFISH sample", "smFISH sample: true spots"]
        widgets = [viewer.window.add_plugin_dock_widget("deepspot-napari", name)[1]
                   for name in ("Enhance spots", "Detect spots", "Train on annotated layers")]
        assert [type(w).__name__ for w in widgets] == ["EnhanceWidget", "DetectWidget", "TrainWidget"]
        assert all(w.viewer is viewer and w.holder is current_model(viewer) for w in widgets)
        assert widgets[0].image.value is viewer.layers["smFISH sample"]
        truth = viewer.layers["smFISH sample: true spots"]
        path = tmp_path / "truth.csv"
        viewer.layers.selection = {truth}
        saved = viewer.layers.save(str(path), selected=True, plugin="deepspot-napari")
        assert saved == [str(path)]
        layers = viewer.open(str(path), plugin="deepspot-napari")
        np.testing.assert_array_equal(layers[0].data, truth.data)


def _polarity_layers(viewer, seed=0, enrichment=0.8):
    from deepspot_napari.polarity import simulated_field
    f = simulated_field(seed, enrichment=enrichment)
    viewer.add_image(f["image"], name="smfish")
    viewer.add_image(f["dapi"], name="dapi")
    viewer.add_points(f["spots"], name="smfish spots")
    viewer.add_labels(f["cells"], name="cells")
    return f


def test_polarity_widget_segments_analyses_and_saves(viewer, tmp_path, messages):
    from deepspot_napari._polarity_widget import PolarityWidget
    f = _polarity_layers(viewer)
    h, w = f["cells"].shape
    viewer.add_shapes([np.array([[-1.0, 0.0], [-1.0, w - 1.0]])], shape_type="line", name="wound")
    widget = PolarityWidget(viewer)
    widget.dapi.value = viewer.layers["dapi"]
    widget.segment()
    assert "dapi nuclei" in viewer.layers and viewer.layers["dapi nuclei"].data.max() == 12
    assert widget.nuclei.value is viewer.layers["dapi nuclei"]
    widget.spots.value = viewer.layers["smfish spots"]
    widget.cells.value = viewer.layers["cells"]
    widget.wound.value = viewer.layers["wound"]
    widget.analyse()
    assert not errors(messages), errors(messages)
    sections = viewer.layers["cells sections"].data
    assert set(np.unique(sections)) == {0, 1, 2, 3}
    assert "12 cells: polarity index 1.00" in widget.status.value
    assert widget.table.shape[0] == 12 and not widget.figure.pixmap().isNull()
    widget.save_folder.value = tmp_path / "pol"
    widget.save()
    assert {p.name for p in (tmp_path / "pol").iterdir()} == {"cells.csv", "summary.csv", "polarity.png"}


def test_polarity_widget_point_or_angle_and_bad_layers(viewer, messages):
    from deepspot_napari._polarity_widget import ANGLE, PolarityWidget
    f = _polarity_layers(viewer, seed=1, enrichment=0.0)
    viewer.add_labels(f["nuclei"], name="nuclei")
    viewer.add_points(np.zeros((0, 2)), name="clicked")
    widget = PolarityWidget(viewer)
    widget.spots.value = viewer.layers["smfish spots"]
    widget.cells.value = viewer.layers["cells"]
    widget.nuclei.value = viewer.layers["nuclei"]
    widget.wound.value = viewer.layers["clicked"]
    widget.analyse()
    assert any("click a point in the wound" in m for m in errors(messages))
    viewer.layers["clicked"].data = np.array([[-50.0, 190.0]])
    widget.analyse()
    assert "12 cells" in widget.status.value
    widget.wound.value = ANGLE
    widget.angle.value = 0.0
    widget.analyse()
    assert "12 cells" in widget.status.value
    viewer.add_labels(np.where(f["nuclei"] > 0, 0, f["cells"]), name="cytoplasm")
    widget.cells.value = viewer.layers["cytoplasm"]
    widget.compartments.value = "cytoplasm"
    widget.analyse()
    assert "12 cells" in widget.status.value
    viewer.add_labels(f["nuclei"][:-1], name="short nuclei")
    widget.nuclei.value = viewer.layers["short nuclei"]
    widget.analyse()
    assert any("must have the same shape" in m for m in errors(messages))
