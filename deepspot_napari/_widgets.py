"""napari widgets: Enhance, Detect and Train (npe2 contributions, see napari.yaml).

The widgets hold no image processing: they call the plain API (Model.enhance / Model.detect /
detect_spots / Model.fit) and only move arrays between napari layers and that API.

* One "current model" per viewer (CurrentModel), shared by the three widgets: loaded once (not
  on every click), replaced by Load / Use bundled, or by the model that Train fine-tuned.
* Every long job is a Task: a napari thread worker with a cancellable napari progress bar (the
  activity dock) and the widget's own Cancel button; results are applied to layers on the GUI
  thread (Qt queued signals), so the viewer stays responsive while the C core works.
* User mistakes (no layer, an RGB layer, a Points layer that does not fit its image, ...) and
  failures of a job end as a napari notification (show_error) with a plain message, never as a
  traceback dialog.
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton,
                              SpinBox)
from napari.layers import Image, Points, Shapes
from napari.qt.threading import create_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import Signal as PsygnalSignal
from qtpy.QtCore import QObject, QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from .detect import DEFAULT_DETECTION, METHODS, SUBPIXEL_MODES, DetectionParams, detect_spots
from .devices import PRECISIONS, available_devices, gpu_not_trusted, precision_choices, probe, resolve_device
from .io import write_bytes
from .model import (BUNDLED_WEIGHTS, DEFAULT_MODEL, DEFAULT_TILE_SIZE, Cancelled, Model, bundled_models,
                    bundled_weights_path, detection_defaults)
from ._reader_writer import points_layer_kwargs
from .train import (DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE, DEFAULT_PATIENCE, DEFAULT_TRAINING_BATCH_SIZE,
                    DEFAULT_VALIDATION_SPLIT, IncompleteAnnotationWarning, check_fit_options, stack_training_pairs)


class UserError(Exception):
    """A mistake the user can fix (shown as a notification, without a traceback)."""


def _report(exc: BaseException, what: str = "") -> None:
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, (UserError, ValueError, TypeError, OSError, MemoryError, RuntimeError)):
        message = f"{type(exc).__name__}: {message}"
    show_error(f"{what}: {message}" if what else message)


def _chosen_file(value, hint: str) -> Path:
    """The file a path field names, or UserError(hint) when it names none (empty, '.', a folder)."""
    if value is None or str(value) in ("", ".") or Path(value).expanduser().is_dir():
        raise UserError(hint)
    return Path(value).expanduser()


def _guarded(what: str):
    """Decorates a button callback: any exception becomes one error notification."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user instead of a traceback dialog
                _report(exc, what)
                return None
        run.__name__ = getattr(fn, "__name__", "callback")
        run.__doc__ = fn.__doc__
        return run
    return wrap


# ----------------------------------------------------------------------------- the current model
def device_choices() -> list[str]:
    """The device menu: "auto" and every device that works on this machine ("cuda" only with a working GPU)."""
    return ["auto"] + [name for name, _ in available_devices()]


class CurrentModel:
    """The model that the Enhance, Detect and Train widgets of one viewer share.

    `get()` takes the weights (`path`; None: the bundled ones) on `device` with `precision` from the
    API's model cache (Model.cached) on first use (thread-safe, callable from workers); `load`
    replaces the model when any of the three changes.
    `version` changes whenever the model does (other weights, device or precision, fine-tuning), so
    cached results made with the former one are recomputed."""

    changed = PsygnalSignal()

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._model: Model | None = None
        self.device = "auto"
        self.precision = "auto"  # bf16 where the CPU has it (within 0.3 F1 points of float32), else float32
        self.label = f"bundled {DEFAULT_MODEL} ({BUNDLED_WEIGHTS})"
        self.path: Path | None = None  # None: the bundled model named `bundled`
        self.bundled = DEFAULT_MODEL
        self.unsaved = False           # fine-tuned weights that exist only in memory
        self.version = 0

    def get(self) -> Model:
        with self._lock:
            if self._model is None:
                self._model = Model.cached(self.path or self.bundled, device=self.device, precision=self.precision)
            return self._model

    def load(self, path: str | Path | None = None, device: str | None = None, precision: str | None = None,
             bundled: str | None = None) -> Model:
        """Loads weights (path; None: the bundled model named `bundled`, default the default one) on
        `device` with `precision` (default: the current ones); raises on error."""
        device = device or self.device
        precision = precision or self.precision
        bundled = bundled or self.bundled
        if path is not None:
            path = _chosen_file(path, "choose a .safetensors weights file first")
            model = Model.cached(path, device=device, precision=precision)
            label = path.name
        else:
            model = Model.cached(bundled, device=device, precision=precision)
            label = f"bundled {bundled} ({model.path.name})"
        with self._lock:
            self.device, self.precision, self.bundled = device, precision, bundled
        self.set(model, label, path=path)
        return model

    def set(self, model: Model, label: str, *, path: Path | None = None, unsaved: bool = False) -> None:
        """Makes `model` (loaded with the current device and precision) the current model."""
        with self._lock:
            self._model = model
            self.label, self.path, self.unsaved = label, path, unsaved
            self.version += 1
        self.changed.emit()

    @property
    def detection(self) -> DetectionParams:
        """The current model's detection defaults (Model.detection), read without loading it."""
        with self._lock:
            model, path = self._model, self.path or self.bundled
        return model.detection if model is not None else detection_defaults(path)

    def copy(self) -> Model:
        """A new Model with the current weights, not the shared cached one (what Train fine-tunes, so
        that Enhance and Detect can go on with the current model meanwhile)."""
        with self._lock:
            path, device, precision = self.path or self.bundled, self.device, self.precision
        return Model.load(path, device=device, precision=precision)

    @property
    def description(self) -> str:
        device = self._model.device if self._model is not None else self.device
        return f"{self.label}{' (not saved)' if self.unsaved else ''} on {device}"

    @property
    def runs_on(self) -> str:
        """The device the model runs on (or will, once loaded) and what it is, e.g. "cpu: CPU, oneDNN 3.2"."""
        model = self._model
        device = model.device if model is not None else resolve_device(self.device, self.precision)
        return f"{device}: {probe(device)[1]}"


_CURRENT: dict[int, CurrentModel] = {}


def _unwrap(viewer):
    """napari hands plugin widgets a PublicOnlyProxy of the viewer, a new one per widget: the real
    viewer is the key that makes the three widgets share one model (and keeps layer identity)."""
    while hasattr(viewer, "__wrapped__"):
        viewer = viewer.__wrapped__
    return viewer


def current_model(viewer) -> CurrentModel:
    """The CurrentModel of `viewer` (one per viewer, created on first use)."""
    viewer = _unwrap(viewer)
    key = id(viewer)
    if key not in _CURRENT:
        _CURRENT[key] = CurrentModel()
        weakref.finalize(viewer, _CURRENT.pop, key, None)
    return _CURRENT[key]


def _deleted(exc: RuntimeError) -> bool:
    """The error Qt bindings raise when a widget was closed while a task still ran."""
    return "has been deleted" in str(exc)


# ----------------------------------------------------------------------------- background tasks
class _Relay(QObject):
    """Carries progress and partial results from a worker thread to the GUI thread (queued)."""

    progressed = Signal(int, int)
    published = Signal(object)


class Task:
    """Runs work(report, cancelled, publish) in a napari thread worker.

    report(done, total) drives a cancellable napari progress bar; cancelled() is True once Cancel
    (the widget's, the progress bar's or the status bar's) was pressed; publish(item) hands a
    partial result to on_partial on the GUI thread. On the GUI thread at the end: on_result(value)
    if the work returned, a notification if it raised (Cancelled: an info), then on_end()."""

    def __init__(self, description: str, work: Callable, *, on_result: Callable[[Any], None] | None = None,
                 on_partial: Callable[[Any], None] | None = None, on_end: Callable[[], None] | None = None,
                 quiet_cancel: bool = False):
        self.description = description
        self.quiet_cancel = quiet_cancel  # stale work cancelled by the widget itself: no notification
        self.outcome: str | None = None  # "done", "cancelled" or "failed" once finished
        self.error: BaseException | None = None
        self._finished_flag = False
        self._cancel = threading.Event()
        self._on_result, self._on_end = on_result, on_end
        self._relay = _Relay()
        self._relay.progressed.connect(self._progress)
        if on_partial is not None:
            self._relay.published.connect(on_partial)
        self.pbar = cancelable_progress(total=0, desc=description)
        self.worker = create_worker(self._body, work, _start_thread=False)
        self.worker.returned.connect(self._returned)
        self.worker.finished.connect(self._finished)
        self.worker.start()

    @property
    def running(self) -> bool:
        """True until the results were applied and the widget told (on_end is running or ran)."""
        return not self._finished_flag

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set() or self.pbar.is_canceled or self.worker.abort_requested

    def _body(self, work):  # worker thread
        try:
            value = work(self._relay.progressed.emit, self.cancelled, self._relay.published.emit)
            return ("cancelled", None) if self.cancelled() else ("done", value)
        except Cancelled as exc:
            return "cancelled", exc
        except BaseException as exc:  # noqa: BLE001 - reported on the GUI thread
            return "failed", exc

    def _progress(self, done: int, total: int) -> None:
        if self.pbar.total != total:
            self.pbar.total = total
        if done != self.pbar.n:
            self.pbar.update(done - self.pbar.n)

    def _returned(self, result) -> None:
        outcome, value = result
        if outcome == "done" and self._on_result is not None:
            try:
                self._on_result(value)
            except RuntimeError as exc:
                if not _deleted(exc):
                    outcome, value = "failed", exc
            except Exception as exc:  # noqa: BLE001
                outcome, value = "failed", exc
        if outcome == "cancelled" and not self.quiet_cancel:
            show_info(f"{self.description}: cancelled")
        elif outcome == "failed":
            self.error = value
            _report(value, self.description)
        self.outcome = outcome

    def _finished(self) -> None:
        self.pbar.close()
        if self.outcome is None:  # the worker died without returning
            self.outcome = "failed"
        self._finished_flag = True
        if self._on_end is not None:
            try:
                self._on_end()
            except RuntimeError as exc:
                if not _deleted(exc):
                    _report(exc, self.description)
            except Exception as exc:  # noqa: BLE001
                _report(exc, self.description)


# ----------------------------------------------------------------------------- layer helpers
def _watch_layers(viewer, container: Container) -> None:
    """Keeps the container's layer choices in step with the viewer's layers."""
    def reset(*_):
        try:
            container.reset_choices()
        except RuntimeError:  # the Qt widget is gone
            pass
    container._deepspot_reset = reset  # the connections below hold weak references
    for name in ("inserted", "removed", "reordered", "renamed"):
        emitter = getattr(viewer.layers.events, name, None)
        if emitter is not None:
            emitter.connect(reset)


def _layer_combo(viewer, kind: type, label: str, raw_only: bool = False, nullable: bool = False,
                 tooltip: str | None = None) -> ComboBox:
    """A combo box of the viewer's layers of `kind` (raw_only: leaving out our enhanced layers;
    nullable: None, shown empty, is a choice)."""
    def choices(_widget=None):
        return [(layer.name, layer) for layer in viewer.layers
                if isinstance(layer, kind) and not (raw_only and _enhanced_state(layer) is not None)]
    return ComboBox(label=label, choices=choices, nullable=nullable, tooltip=tooltip)


def _full_resolution(layer: Image):
    return layer.data[0] if layer.multiscale else layer.data


def _checked_image(layer, what: str = "image") -> Image:
    """The layer, if it is a greyscale Image layer of at least 2 dimensions."""
    if layer is None:
        raise UserError(f"no {what} layer chosen: open an image (File > Open, or File > Open Sample > DeepSpot) "
                        "and pick it in the widget")
    if not isinstance(layer, Image):
        raise UserError(f"layer '{layer.name}' is a {type(layer).__name__} layer; choose an Image layer")
    if layer.rgb:
        raise UserError(f"layer '{layer.name}' is an RGB colour image; DeepSpot needs a greyscale image "
                        "(one channel): split the channels first (right-click the layer > Split RGB)")
    data = _full_resolution(layer)
    if data.ndim < 2:
        raise UserError(f"layer '{layer.name}' has {data.ndim} dimension; expected an image (Y, X) or a stack (..., Y, X)")
    dtype = np.dtype(data.dtype)
    if dtype == bool or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UserError(f"layer '{layer.name}' has data of type {dtype}; expected integer or floating-point intensities")
    if min(data.shape[-2:]) < 2:
        raise UserError(f"layer '{layer.name}' has shape {tuple(data.shape)}: its last two axes (Y, X) must be at "
                        "least 2 pixels each")
    return layer


def _plane_in_view(viewer, layer: Image) -> tuple[int, ...]:
    """Index of the (Y, X) plane of `layer` that the viewer shows now (() for a 2D image)."""
    data = _full_resolution(layer)
    lead = data.ndim - 2
    if lead == 0:
        return ()
    position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)
    return tuple(int(np.clip(np.round(p), 0, n - 1)) for p, n in zip(position[:lead], data.shape[:lead]))


# View first only pays when the view shows less than this fraction of the plane.
VIEW_FIRST_MAX_FRACTION = 0.5


def _box_in_view(viewer, layer: Image) -> tuple | None:
    """((r0, r1), (c0, c1)): the part of the layer's (Y, X) plane that the canvas shows, or None when it
    shows most of the plane (or the view cannot be told: 3D display, a canvas not shown yet)."""
    shape = _full_resolution(layer).shape[-2:]
    try:
        if viewer.dims.ndisplay != 2:
            return None
        canvas = viewer.window._qt_viewer.canvas.size if getattr(viewer, "window", None) is not None else None
        height, width = (canvas[0], canvas[1]) if canvas is not None else (0, 0)
    except (AttributeError, RuntimeError, TypeError, IndexError):
        return None
    if height <= 1 or width <= 1:
        return None
    zoom = float(viewer.camera.zoom)
    centre = np.asarray(viewer.camera.center[-2:], dtype=float)
    half = np.array([height, width], dtype=float) / zoom / 2
    scale, translate = np.asarray(layer.scale[-2:], float), np.asarray(layer.translate[-2:], float)
    low = np.floor((centre - half - translate) / scale).astype(int)
    high = np.ceil((centre + half - translate) / scale).astype(int) + 1
    low, high = np.clip(low, 0, shape), np.clip(high, 0, shape)
    if np.any(high <= low) or np.prod(high - low) > VIEW_FIRST_MAX_FRACTION * shape[0] * shape[1]:
        return None
    return (int(low[0]), int(high[0])), (int(low[1]), int(high[1]))


def _next_plane(viewer, layer: Image, index: tuple) -> tuple | None:
    """The plane after `index` along the axis the user last moved (for prefetching), or None at the end."""
    shape = _full_resolution(layer).shape[:-2]
    if not index:
        return None
    axis = getattr(viewer.dims, "last_used", 0) - (viewer.dims.ndim - len(shape) - 2)
    axis = axis if 0 <= axis < len(shape) else len(shape) - 1
    following = list(index)
    following[axis] += 1
    return tuple(following) if following[axis] < shape[axis] else None


def _source_name(layer: Image) -> str:
    state = layer.metadata.get("deepspot") if isinstance(layer.metadata, dict) else None
    return state["source"] if state else layer.name


def _enhanced_state(layer) -> dict | None:
    state = layer.metadata.get("deepspot") if isinstance(layer, Image) and isinstance(layer.metadata, dict) else None
    return state if state and "done" in state else None


def enhanced_target(viewer, source: Image, holder: CurrentModel) -> tuple[Image, dict]:
    """The "<name> enhanced" layer of `source` and its cache state, created (zeros) or reset when
    it holds results of other weights or of other data. state["done"]: plane indices enhanced."""
    data = _full_resolution(source)
    name = f"{source.name} enhanced"
    key = (holder.version, id(source.data), tuple(data.shape))
    out = viewer.layers[name] if name in viewer.layers else None
    state = _enhanced_state(out)
    reusable = (isinstance(out, Image) and isinstance(out.data, np.ndarray) and out.data.shape == tuple(data.shape)
                and out.data.dtype == np.float32 and out.data.flags.writeable)
    if reusable and state is not None and state.get("key") == key:
        return out, state
    state = {"source": source.name, "key": key, "done": set(), "model": holder.description}
    if reusable:
        out.data[...] = 0
        out.metadata["deepspot"] = state
        out.refresh()
        return out, state
    zeros = np.zeros(tuple(data.shape), np.float32)  # calloc: planes take memory once enhanced
    if out is not None:
        viewer.layers.remove(out)
    out = viewer.add_image(zeros, name=name, colormap="inferno", contrast_limits=(0.0, 1.0), blending="additive",
                           scale=source.scale, translate=source.translate, metadata={"deepspot": state})
    return out, state


def _stack_planes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(np.ndindex(*shape[:-2])) if len(shape) > 2 else [()]


def _enhance_planes_work(holder: CurrentModel, source, planes: list[tuple[int, ...]], tile_size: int,
                         view: tuple | None = None):
    """The worker side of enhancing some planes: publishes (index, result or error, None) per plane; with
    view ((r0, r1), (c0, c1)) of the first plane, first (index, that part enhanced, None, view)."""
    def work(report, cancelled, publish):
        model = holder.get()
        n = len(planes)
        if view is not None and planes:
            try:
                publish((planes[0], model.enhance_region(np.asarray(source[planes[0]]), *view, cancel=cancelled),
                         None, view))
            except (ValueError, TypeError):
                pass  # a blank plane: the whole-plane pass below says why
        per_plane = [1]
        for k, index in enumerate(planes):
            plane = np.asarray(source[index])

            def step(done, total, k=k):
                per_plane[0] = total
                report(k * total + done, n * total)
            try:
                result = model.enhance(plane, tile_size=tile_size, progress=step, cancel=cancelled)
            except (ValueError, TypeError) as exc:
                if index == ():  # a 2D image: nothing else to show
                    raise
                publish((index, None, str(exc)))
                continue
            publish((index, result, None))
            report((k + 1) * per_plane[0], n * per_plane[0])
        return n
    return work


class _PlaneWriter:
    """GUI-thread side: writes published planes (and parts in view) into the enhanced layer if it is
    still current. Only whole planes count as done (the cache); clear_partial() blanks the parts of a
    plane whose whole pass never came (cancelled or failed), so no half-filled plane stays."""

    def __init__(self, layer: Image, state: dict):
        self.layer, self.state, self.skipped = layer, state, []
        self.partial: dict[tuple, tuple] = {}  # plane index -> the part shown before the whole plane

    def __call__(self, item) -> None:
        index, result, error, *view = item
        if self.layer.metadata.get("deepspot") is not self.state:
            return  # the layer was reset (other weights) meanwhile
        if view and view[0] is not None:
            (r0, r1), (c0, c1) = view[0]
            self.layer.data[index][r0:r1, c0:c1] = result
            self.partial[index] = view[0]
            self.layer.refresh()
            return
        self.partial.pop(index, None)
        if error is not None:
            self.skipped.append(f"plane {index}: {error}")
            self.state["done"].add(index)
            return
        self.layer.data[index] = result
        self.state["done"].add(index)
        self.layer.refresh()

    def clear_partial(self) -> None:
        if self.layer.metadata.get("deepspot") is not self.state:
            return
        for index, ((r0, r1), (c0, c1)) in self.partial.items():
            if index not in self.state["done"]:
                self.layer.data[index][r0:r1, c0:c1] = 0
        if self.partial:
            self.layer.refresh()
        self.partial.clear()

    def warn_skipped(self) -> None:
        if self.skipped:
            show_warning(f"{len(self.skipped)} plane(s) left black: " + "; ".join(self.skipped[:3])
                         + (" ..." if len(self.skipped) > 3 else ""))


# ----------------------------------------------------------------------------- the model panel
class ModelPanel(Container):
    """Shows the shared current model; loads another weights file, the bundled one, or changes the
    device or precision (the precision choice shows only where a GPU works or the CPU has bf16 instructions)."""

    def __init__(self, holder: CurrentModel):
        self.holder = holder
        self.info = Label(label="model")
        self.weights = FileEdit(label="weights", mode="r", filter="*.safetensors")
        choices = device_choices()
        self.device = ComboBox(label="device", choices=choices, value=holder.device)
        self.precision = ComboBox(label="precision", choices=list(PRECISIONS), value=holder.precision,
                                  visible=any(len(precision_choices(d)) > 2 for d in choices if d != "auto"),
                                  tooltip="tf32: TF32 tensor-core convolutions on the GPU; bf16: bf16 convolutions "
                                          "on the CPU (both faster, less exact); auto: bf16 where it runs")
        self.load_button = PushButton(text="Load weights")
        self.bundled = ComboBox(label="bundled", choices=bundled_models(),
                                tooltip="the models shipped with the plugin (weights/README.md); hybrid: the "
                                        "published DeepSpot weights")
        self.bundled_button = PushButton(text="Use bundled")
        buttons = Container(widgets=[self.load_button, self.bundled_button], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        super().__init__(widgets=[self.info, self.weights, self.bundled, self.device, self.precision, buttons],
                         labels=True)
        self.margins = (0, 0, 0, 0)
        self.load_button.changed.connect(self._load)
        self.bundled_button.changed.connect(self._bundled)
        self.device.changed.connect(lambda device: self._reload(device=device))
        self.precision.changed.connect(lambda precision: self._reload(precision=precision))
        holder.changed.connect(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        try:
            self.info.value = self.holder.description
            self.info.tooltip = str(self.holder.path or f"the bundled {self.holder.bundled} model (weights/README.md)")
            untrusted = gpu_not_trusted()
            self.device.tooltip = f"runs on {self.holder.runs_on}" + (
                f"\nthe GPU present is not used: {untrusted}" if untrusted else "")
            for combo, value in ((self.device, self.holder.device), (self.precision, self.holder.precision)):
                if combo.value != value:
                    with combo.changed.blocked():
                        combo.value = value
        except RuntimeError:  # widget deleted
            pass

    @_guarded("Load weights")
    def _load(self, *_):
        self.holder.load(_chosen_file(self.weights.value,
                                      "choose a .safetensors weights file first (the 'weights' field)"))
        show_info(f"DeepSpot model: {self.holder.description}")

    @_guarded("Use bundled weights")
    def _bundled(self, *_):
        self.holder.load(None, bundled=self.bundled.value)
        show_info(f"DeepSpot model: {self.holder.description}")

    def _reload(self, **setting: str) -> None:
        """Loads the current weights again with another device or precision, for every widget; on
        failure, reports it and shows the current setting again."""
        holder = self.holder
        try:
            label, unsaved = holder.label, holder.unsaved
            holder.load(holder.path, **setting)
            if unsaved:  # the same fine-tuned weights, on another device or precision
                holder.set(holder.get(), label, path=holder.path, unsaved=True)
        except Exception as exc:  # noqa: BLE001
            _report(exc, ", ".join(f"{name} {value}" for name, value in setting.items()))
            self._refresh()


# ----------------------------------------------------------------------------- Enhance
class EnhanceWidget(Container):
    """Enhance an image layer (2D, z-stack, time series; any size) into "<name> enhanced".

    "Enhance plane in view" enhances the plane the viewer shows, on demand: the part on screen first,
    then the whole plane, which is cached; moving on cancels work on a plane no longer in view, and
    the next plane is prefetched while you look. "Enhance" (all planes) completes the rest."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer = _unwrap(napari_viewer)
        self.holder = current_model(napari_viewer)
        self.image = _layer_combo(napari_viewer, Image, "image", raw_only=True)
        self.model_panel = ModelPanel(self.holder)
        self.tile_size = SpinBox(label="tile size", value=DEFAULT_TILE_SIZE, min=128, max=8192, step=16,
                                 tooltip="planes larger than this are processed in tiles (same result, bounded memory)")
        self.in_view = CheckBox(text="Enhance plane in view (on demand, cached)", value=False)
        self.run_button = PushButton(text="Enhance all planes")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        super().__init__(widgets=[self.image, self.model_panel, self.tile_size, self.in_view,
                                  Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                                            labels=False),
                                  self.status])
        self.all_task: Task | None = None
        self.plane_task: Task | None = None
        self._plane_index: tuple | None = None  # the plane plane_task works on
        self._pending = False
        self._starting = False
        _watch_layers(napari_viewer, self)
        self.run_button.changed.connect(self.enhance_all)
        self.cancel_button.changed.connect(self.cancel)
        self.in_view.changed.connect(self._in_view_toggled)
        self.image.changed.connect(self._image_changed)
        napari_viewer.dims.events.current_step.connect(self._dims_changed)
        self.holder.changed.connect(self._dims_changed)
        self._image_changed()

    # -- state
    @property
    def busy(self) -> bool:
        return any(t is not None and t.running for t in (self.all_task, self.plane_task))

    def _update_buttons(self) -> None:
        try:
            self.cancel_button.enabled = self.busy
            self.run_button.enabled = not (self.all_task is not None and self.all_task.running)
        except RuntimeError:
            pass

    def _image_changed(self, *_):
        layer = self.image.value
        is_stack = layer is not None and _full_resolution(layer).ndim > 2 and not layer.rgb
        try:
            self.run_button.text = "Enhance all planes" if is_stack else "Enhance"
        except RuntimeError:
            return
        self._dims_changed()

    # -- actions
    @_guarded("Enhance")
    def enhance_all(self, *_):
        """Enhances every plane of the chosen layer that is not cached yet."""
        layer = _checked_image(self.image.value)
        if self.all_task is not None and self.all_task.running:
            raise UserError("an enhancement is already running: cancel it first")
        out, state = enhanced_target(self.viewer, layer, self.holder)
        planes = [p for p in _stack_planes(out.data.shape) if p not in state["done"]]
        if not planes:
            self.status.value = f"'{out.name}' is up to date"
            show_info(f"'{out.name}' is already enhanced with the current model")
            return
        writer = _PlaneWriter(out, state)
        n = len(planes)

        def done(_):
            writer.warn_skipped()
            self.status.value = f"'{out.name}': {n} plane(s) enhanced" if n > 1 else f"'{out.name}' done"

        self.status.value = f"enhancing {n} plane(s) of '{layer.name}' ..."
        self.all_task = Task(f"Enhancing '{layer.name}'",
                             _enhance_planes_work(self.holder, _full_resolution(layer), planes, self.tile_size.value),
                             on_partial=writer, on_result=done, on_end=self._task_ended)
        self._update_buttons()

    def cancel(self, *_):
        self._pending = False
        for task in (self.all_task, self.plane_task):
            if task is not None and task.running:
                task.cancel()

    def _task_ended(self) -> None:
        self._update_buttons()
        if self.all_task is not None and self.all_task.outcome == "cancelled":
            self.status.value = "cancelled"
        if self._pending:
            self._pending = False
            self._dims_changed()

    def _in_view_toggled(self, on: bool) -> None:
        if on:
            try:
                _checked_image(self.image.value)
            except UserError as exc:
                _report(exc, "Enhance plane in view")
                return
            self._dims_changed()

    def _dims_changed(self, *_):
        """Enhances the plane in view if the on-demand option is on and it is not cached: the part the
        canvas shows first (Model.enhance_region), then the whole plane, which alone is cached. Work on a
        plane no longer in view is cancelled; once the plane in view is cached, the next one is prefetched."""
        try:
            if not self.in_view.value:
                return
        except RuntimeError:
            return
        layer = self.image.value
        try:
            layer = _checked_image(layer)
        except UserError:
            return  # reported when the option was switched on
        if self.all_task is not None and self.all_task.running:
            return  # enhance-all covers it
        if self._starting:
            return  # re-entered: adding the enhanced layer changes the dims
        self._starting = True
        try:
            out, state = enhanced_target(self.viewer, layer, self.holder)
            index = _plane_in_view(self.viewer, layer)
        except Exception as exc:  # noqa: BLE001
            _report(exc, "Enhance plane in view")
            return
        finally:
            self._starting = False
        if self.plane_task is not None and self.plane_task.running:
            if self._plane_index == index:
                return  # already at work on it (in view first, or prefetching it)
            self.plane_task.cancel()  # stale: the plane left the view
            self._pending = True      # looked at again once it has stopped
            return
        if index in state["done"]:
            self._prefetch(layer, out, state, index)
            return
        view = _box_in_view(self.viewer, layer)
        self._start_plane(layer, out, state, index, view)

    def _start_plane(self, layer, out, state, index, view, prefetch: bool = False) -> None:
        writer = _PlaneWriter(out, state)
        where = f"plane {index}" if index else "image"
        self.status.value = f"{'prefetching' if prefetch else 'enhancing'} {where} of '{layer.name}' ..."

        def done(_):
            writer.warn_skipped()  # a blank plane: said once, then left black (it counts as done)
            self.status.value = f"'{out.name}': {len(state['done'])} plane(s) cached"

        def ended():
            if self.plane_task is not None and self.plane_task.outcome != "done":
                writer.clear_partial()
            self._task_ended()
            if self.plane_task is not None and self.plane_task.outcome == "done" and not self._pending:
                self._dims_changed()  # the plane in view is cached now: prefetch the next one
        self._plane_index = index
        self.plane_task = Task(f"{'Prefetching' if prefetch else 'Enhancing'} {where} of '{layer.name}'",
                               _enhance_planes_work(self.holder, _full_resolution(layer), [index],
                                                    self.tile_size.value, view),
                               on_partial=writer, on_result=done, on_end=ended, quiet_cancel=True)
        self._update_buttons()

    def _prefetch(self, layer, out, state, index) -> None:
        following = _next_plane(self.viewer, layer, index)
        if following is not None and following not in state["done"]:
            self._start_plane(layer, out, state, following, None, prefetch=True)


# ----------------------------------------------------------------------------- Detect
# the stack menu: its labels and detect_spots' stack modes
STACK_CHOICES = {"z-stack (merge spots across planes)": "zstack", "independent planes (time series)": "planes"}


class DetectWidget(Container):
    """Detect spots in an image layer or its enhanced layer; outputs a Points layer "<name> spots"
    whose features table holds score, intensity and size (points sized and coloured by score)."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer = _unwrap(napari_viewer)
        self.holder = current_model(napari_viewer)
        self.image = _layer_combo(napari_viewer, Image, "image")
        self.enhance_first = CheckBox(text="Enhance first (with the current model)", value=True)
        self.model_panel = ModelPanel(self.holder)
        self.stack_mode = ComboBox(label="stacks", choices=list(STACK_CHOICES), visible=False)
        d = DEFAULT_DETECTION
        self.method = ComboBox(label="method", choices=list(METHODS), value=d.method)
        self.threshold = FloatSpinBox(label="threshold", value=d.threshold, min=0.0, max=1.0, step=0.005,
                                      tooltip="peak: minimum enhanced value of a spot centre (enhanced images are in [0, 1])")
        self.min_distance = FloatSpinBox(label="min distance (px)", value=d.min_distance, min=0.0, max=100.0, step=0.5)
        self.footprint_radius = SpinBox(label="footprint radius", value=d.footprint_radius, min=0, max=20)
        self.scales = LineEdit(label="wavelet scales", value=",".join(map(str, d.scales)))
        self.sensitivities = LineEdit(label="sensitivities", value=",".join(f"{s:g}" for s in d.sensitivities))
        self.subpixel = ComboBox(label="subpixel", choices=list(SUBPIXEL_MODES), value=d.subpixel)
        self.window_radius = SpinBox(label="window radius", value=d.window_radius, min=1, max=20)
        self.merge_radius = FloatSpinBox(label="z merge radius", value=d.merge_radius, min=0.0, max=50.0, step=0.5)
        self.defaults_button = PushButton(text="Reset to defaults")
        self.params_box = Container(widgets=[self.method, self.threshold, self.min_distance, self.footprint_radius,
                                             self.scales, self.sensitivities, self.subpixel, self.window_radius,
                                             self.merge_radius, self.defaults_button], label="parameters")
        self.run_button = PushButton(text="Detect")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.table_button = PushButton(text="Show features table", enabled=False,
                                       tooltip="napari's features table of the spots layer (Layers > Metadata)")
        super().__init__(widgets=[self.image, self.enhance_first, self.model_panel, self.stack_mode,
                                  Label(value="Detection parameters (the model's defaults, fixed on validation data):"),
                                  self.params_box,
                                  Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                                            labels=False),
                                  self.status, self.table_button])
        self.spots_layer: Points | None = None
        self.task: Task | None = None
        _watch_layers(napari_viewer, self)
        self.image.changed.connect(self._image_changed)
        self.method.changed.connect(self._method_changed)
        self.enhance_first.changed.connect(self._enhance_first_changed)
        self.defaults_button.changed.connect(self.reset_defaults)
        self.holder.changed.connect(self._model_changed)
        self.run_button.changed.connect(self.detect)
        self.cancel_button.changed.connect(self.cancel)
        self.table_button.changed.connect(self.show_table)
        for widget in (self.threshold, self.min_distance, self.merge_radius):
            widget.native.setDecimals(3)
        self.reset_defaults()
        self._method_changed()
        self._image_changed()

    def _image_changed(self, *_):
        layer = self.image.value
        try:
            if layer is None:
                self.stack_mode.visible = False
                return
            self.enhance_first.value = _enhanced_state(layer) is None
            self.stack_mode.visible = _full_resolution(layer).ndim > 2 and not layer.rgb
        except RuntimeError:
            pass

    def _enhance_first_changed(self, on: bool) -> None:
        self.model_panel.visible = bool(on)

    def _method_changed(self, *_):
        peak = self.method.value == "peak"
        for widget in (self.threshold, self.min_distance, self.footprint_radius):
            widget.visible = peak
        for widget in (self.scales, self.sensitivities):
            widget.visible = not peak

    def _model_defaults(self) -> DetectionParams | None:
        """The current model's detection defaults (Model.detection), None where its weights cannot be
        read (a model that fails to load says so when it is used)."""
        try:
            return self.holder.detection
        except Exception:  # noqa: BLE001
            return None

    def _model_changed(self, *_):
        """Another model may come with other detection defaults: show them."""
        defaults = self._model_defaults()
        if defaults is not None and defaults != self._model_detection:
            self.reset_defaults()

    def reset_defaults(self, *_):
        d = self._model_defaults() or DEFAULT_DETECTION
        self._model_detection = d
        self.method.value, self.threshold.value, self.min_distance.value = d.method, d.threshold, d.min_distance
        self.footprint_radius.value, self.subpixel.value = d.footprint_radius, d.subpixel
        self.window_radius.value, self.merge_radius.value = d.window_radius, d.merge_radius
        self.scales.value = ",".join(map(str, d.scales))
        self.sensitivities.value = ",".join(f"{s:g}" for s in d.sensitivities)

    def params(self) -> DetectionParams:
        """The parameters shown (the current model's defaults unless edited)."""
        def numbers(widget, kind, what):
            try:
                values = tuple(kind(v) for v in str(widget.value).replace(";", ",").split(",") if v.strip())
            except ValueError:
                raise UserError(f"{what}: '{widget.value}' is not a comma-separated list of numbers") from None
            if not values:
                raise UserError(f"{what}: give at least one value")
            return values
        return dataclasses.replace(
            DEFAULT_DETECTION, method=self.method.value, threshold=float(self.threshold.value),
            min_distance=float(self.min_distance.value), footprint_radius=int(self.footprint_radius.value),
            scales=numbers(self.scales, int, "wavelet scales"),
            sensitivities=numbers(self.sensitivities, float, "sensitivities"),
            subpixel=self.subpixel.value, window_radius=int(self.window_radius.value),
            merge_radius=float(self.merge_radius.value))

    def cancel(self, *_):
        if self.task is not None and self.task.running:
            self.task.cancel()

    def _raw_for(self, layer: Image):
        """The raw image that an enhanced layer came from (for intensities), else the layer itself."""
        state = _enhanced_state(layer)
        if state is not None and state["source"] in self.viewer.layers:
            raw = self.viewer.layers[state["source"]]
            if isinstance(raw, Image) and tuple(_full_resolution(raw).shape) == tuple(_full_resolution(layer).shape):
                return raw
        return layer

    @_guarded("Detect")
    def detect(self, *_):
        """Detects spots (enhancing first if asked) and adds or replaces the "<name> spots" layer."""
        layer = _checked_image(self.image.value)
        if self.task is not None and self.task.running:
            raise UserError("a detection is already running: cancel it first")
        params = self.params()
        mode = STACK_CHOICES[self.stack_mode.value]
        enhance = bool(self.enhance_first.value)
        state = _enhanced_state(layer)
        if enhance and state is not None:
            raise UserError(f"'{layer.name}' is already an enhanced layer: untick 'Enhance first', or pick "
                            f"'{state['source']}'")
        if state is not None:
            n_planes = len(_stack_planes(_full_resolution(layer).shape))
            if len(state["done"]) < n_planes:
                show_warning(f"only {len(state['done'])} of {n_planes} planes of '{layer.name}' are enhanced yet: "
                             f"spots are found in those only (pick '{state['source']}' with 'Enhance first' to "
                             "enhance the rest)")
        raw_layer = layer if enhance else self._raw_for(layer)
        raw = _full_resolution(raw_layer)
        name = f"{_source_name(layer)} spots"
        work_enhance = None
        enhanced_source = None
        if enhance:
            out, state = enhanced_target(self.viewer, layer, self.holder)
            planes = [p for p in _stack_planes(out.data.shape) if p not in state["done"]]
            enhanced_source = out.data
            if planes:  # enhance what is not cached, into the "<name> enhanced" layer
                writer = _PlaneWriter(out, state)
                work_enhance = (writer, _enhance_planes_work(self.holder, raw, planes, DEFAULT_TILE_SIZE))
        else:
            enhanced_source = _full_resolution(layer)
            if state is None:
                show_info(f"'{layer.name}' is not an enhanced layer: detecting on it as it is (tick 'Enhance "
                          "first' to enhance it with the model)")

        def work(report, cancelled, publish):
            if work_enhance is not None:
                results = {}

                def keep(item):
                    results[item[0]] = item
                    publish(("plane", item))
                work_enhance[1](report, cancelled, keep)
                failed = [str(item[2]) for item in results.values() if item[2] is not None]
                if failed and len(results) == 1:
                    raise ValueError(failed[0])
                enhanced = np.zeros(raw.shape, np.float32)
                enhanced[...] = enhanced_source  # planes cached before
                for index, result, _ in results.values():
                    if result is not None:
                        enhanced[index] = result
            else:
                enhanced = np.asarray(enhanced_source, dtype=np.float32)
            spots = detect_spots(enhanced, np.asarray(raw), params=params, stack=mode, cancel=cancelled)
            return spots.coords, {name: getattr(spots, name) for name in ("score", "intensity", "size")}

        def partial(item):
            if item[0] == "plane" and work_enhance is not None:
                work_enhance[0](item[1])

        def done(result):
            coords, features = result
            if work_enhance is not None:
                work_enhance[0].warn_skipped()
            self.spots_layer = self._show_spots(name, coords, features, raw_layer, params)
            self.table_button.enabled = True
            self.status.value = f"{len(coords)} spots -> '{name}'"

        self.status.value = f"detecting spots in '{layer.name}' ..."
        self.task = Task(f"Detecting spots in '{layer.name}'", work, on_partial=partial, on_result=done,
                         on_end=self._ended)
        self.cancel_button.enabled = True
        self.run_button.enabled = False

    def _ended(self) -> None:
        try:
            self.cancel_button.enabled = False
            self.run_button.enabled = True
            if self.task is not None and self.task.outcome == "cancelled":
                self.status.value = "cancelled"
        except RuntimeError:
            pass

    @_guarded("Show features table")
    def show_table(self, *_):
        """Selects the spots layer and docks napari's features table widget (score, intensity, size)."""
        layer = self.spots_layer
        if layer is None or layer not in self.viewer.layers:
            raise UserError("no spots layer yet: run Detect first")
        self.viewer.layers.selection.active = layer
        self.viewer.window.add_plugin_dock_widget("napari", "Features table widget")

    def _show_spots(self, name: str, coords: np.ndarray, features: dict, image: Image, params) -> Points:
        kwargs = points_layer_kwargs(features, coords.shape[1], name=name)
        kwargs.update(scale=image.scale, translate=image.translate,
                      metadata={"deepspot": {"image": image.name, "params": dataclasses.asdict(params)}})
        index = None
        if name in self.viewer.layers:
            old = self.viewer.layers[name]
            index = self.viewer.layers.index(old)
            self.viewer.layers.remove(old)
        layer = Points(coords, **kwargs)
        if index is None:
            self.viewer.add_layer(layer)
        else:
            self.viewer.layers.insert(index, layer)
        return layer


# ----------------------------------------------------------------------------- Train
def points_in_image(points: Points, image: Image) -> np.ndarray:
    """The points of `points` in `image`'s pixel coordinates (n, image ndim); raises UserError
    when the layers do not fit: other dimensionality, or points outside the image."""
    data = _full_resolution(image)
    coords = np.asarray(points.data, dtype=float).reshape(-1, points.ndim)
    if points.ndim != data.ndim:
        raise UserError(f"Points layer '{points.name}' has {points.ndim} dimensions but image '{image.name}' has "
                        f"{data.ndim} (shape {tuple(data.shape)}): annotate the image itself, or pick the matching "
                        "pair")
    if len(coords):
        world = coords * np.asarray(points.scale) + np.asarray(points.translate)
        coords = (world - np.asarray(image.translate)) / np.asarray(image.scale)
        shape = np.asarray(data.shape, dtype=float)
        outside = np.any((coords < -0.5) | (coords > shape - 0.5), axis=1)
        if outside.any():
            raise UserError(f"{int(outside.sum())} of {len(coords)} points of '{points.name}' lie outside image "
                            f"'{image.name}' (shape {tuple(data.shape)}): is this the right pair of layers?")
    return coords


def area_rectangles(shapes: Shapes, image: Image) -> list[tuple[int, int, int, int]]:
    """The bounding rectangles (y0, x0, y1, x1), end-exclusive image pixels of the last two axes,
    of the shapes of `shapes` (any kind: rectangles, polygons, ellipses), clipped to the image;
    raises UserError when there are none or one lies wholly outside the image."""
    data = _full_resolution(image)
    h, w = data.shape[-2:]
    if len(shapes.data) == 0:
        raise UserError(f"Shapes layer '{shapes.name}' holds no shape: draw a rectangle around the part you "
                        "annotated, or leave 'area' empty to train on the whole image")
    scale, translate = np.asarray(shapes.scale)[-2:], np.asarray(shapes.translate)[-2:]
    rectangles = []
    for vertices in shapes.data:
        world = np.asarray(vertices, float)[:, -2:] * scale + translate
        pixels = (world - np.asarray(image.translate)[-2:]) / np.asarray(image.scale)[-2:]
        (y0, x0), (y1, x1) = np.floor(pixels.min(axis=0) + 0.5), np.floor(pixels.max(axis=0) + 0.5) + 1
        y0, x0, y1, x1 = int(max(y0, 0)), int(max(x0, 0)), int(min(y1, h)), int(min(x1, w))
        if y1 <= y0 or x1 <= x0:
            raise UserError(f"a shape of '{shapes.name}' lies outside image '{image.name}' ({h}x{w}): is this the "
                            "right Shapes layer?")
        rectangles.append((y0, x0, y1, x1))
    return rectangles


def training_pairs(pairs: list[tuple]) -> tuple[list[np.ndarray], list[np.ndarray], list | None]:
    """(images, points, regions) for Model.fit from (image, points[, area]) layer tuples: 2D planes
    with their (y, x) points (a stack split by train.stack_training_pairs: its annotated planes)
    and, where an area (Shapes) layer is given, the rectangles where every spot was marked (None:
    the whole plane); an area applies to each plane of its stack."""
    if not pairs:
        raise UserError("add at least one pair of an image layer and the Points layer annotating it")
    images, points, regions = [], [], []
    seen = set()
    for pair in pairs:
        image, pts = pair[0], pair[1]
        area = pair[2] if len(pair) > 2 else None
        if image is None or pts is None:
            raise UserError("every pair needs an image layer and a Points layer: pick both, or remove the row")
        _checked_image(image)
        if not isinstance(pts, Points):
            raise UserError(f"layer '{pts.name}' is not a Points layer")
        if (id(image), id(pts), id(area)) in seen:
            continue
        seen.add((id(image), id(pts), id(area)))
        coords = points_in_image(pts, image)
        rectangles = area_rectangles(area, image) if area is not None else None
        plane_images, plane_points = stack_training_pairs(_full_resolution(image), coords)
        images += plane_images
        points += plane_points
        regions += [rectangles] * len(plane_images)
    if sum(len(p) for p in points) == 0:
        raise UserError("the Points layers hold no points: annotate spots first (Points layer, add mode), or run "
                        "Detect and correct its result")
    return images, points, (regions if any(r is not None for r in regions) else None)


class LossPlot(QWidget):
    """A small live plot per epoch: training and validation loss (left axis) and validation F1
    (right axis, dashed), each axis fitted to its values so that small changes show."""

    SERIES = (("loss", "#4fc3f7"), ("val_loss", "#ffb74d"), ("val_f1", "#81c784"))

    def __init__(self, parent=None):
        super().__init__(parent)
        self.history: dict[str, list[float]] = {}
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def set_history(self, history: dict[str, list[float]]) -> None:
        self.history = {k: [float(v) for v in vs] for k, vs in history.items()}
        self.update()

    @staticmethod
    def _range(values: list[float], floor: float | None = None, ceiling: float | None = None):
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        low, high = min(finite), max(finite)
        pad = (high - low) * 0.1 or abs(high) * 0.05 or 0.05
        low, high = low - pad, high + pad
        if floor is not None:
            low = max(low, floor)
        if ceiling is not None:
            high = min(high, ceiling)
        return low, high

    def paintEvent(self, event):  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), QColor("#262930"))
        rect = self.rect().adjusted(46, 8, -46, -38)
        painter.setPen(QPen(QColor("#5a5f6b"), 1))
        painter.drawRect(rect)
        n = max((len(v) for v in self.history.values()), default=0)
        losses = self.history.get("loss", []) + self.history.get("val_loss", [])
        loss_range = self._range(losses, floor=0.0)
        f1_range = self._range(self.history.get("val_f1", []), floor=0.0, ceiling=1.0)
        painter.setPen(QColor("#c0c4cc"))
        if loss_range is None or n == 0:
            painter.drawText(rect, Qt.AlignCenter, "loss and F1 appear here while training")
            painter.end()
            return
        painter.drawText(4, rect.top() + 10, f"{loss_range[1]:.3g}")
        painter.drawText(4, rect.bottom(), f"{loss_range[0]:.3g}")
        if f1_range is not None:
            painter.drawText(rect.right() + 4, rect.top() + 10, f"{f1_range[1]:.2f}")
            painter.drawText(rect.right() + 4, rect.bottom(), f"{f1_range[0]:.2f}")
        painter.drawText(rect.left(), rect.bottom() + 14, "epoch 1")
        painter.drawText(rect.right() - 24, rect.bottom() + 14, f"{n}")
        for key, colour in self.SERIES:
            values = self.history.get(key, [])
            low_high = f1_range if key == "val_f1" else loss_range
            if not values or low_high is None:
                continue
            low, high = low_high
            path = QPainterPath()
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    continue
                x = rect.left() + (rect.width() * i / max(n - 1, 1))
                y = rect.bottom() - rect.height() * min(max((v - low) / (high - low), 0.0), 1.0)
                if path.elementCount() == 0:
                    path.moveTo(QPointF(x, y))
                else:
                    path.lineTo(QPointF(x, y))
            painter.setPen(QPen(QColor(colour), 2, Qt.DashLine if key == "val_f1" else Qt.SolidLine))
            painter.drawPath(path)
            if path.elementCount() == 1:
                painter.drawEllipse(path.currentPosition(), 2, 2)
        legend_x = rect.left()
        for key, colour, label in (("loss", "#4fc3f7", "loss"), ("val_loss", "#ffb74d", "validation loss"),
                                   ("val_f1", "#81c784", "validation F1 (right)")):
            if any(math.isfinite(v) for v in self.history.get(key, [])):
                painter.setPen(QPen(QColor(colour), 2))
                painter.drawLine(legend_x, rect.bottom() + 28, legend_x + 14, rect.bottom() + 28)
                painter.setPen(QColor("#c0c4cc"))
                painter.drawText(legend_x + 18, rect.bottom() + 32, label)
                legend_x += 26 + painter.fontMetrics().horizontalAdvance(label)
        painter.end()


class _PairRow(Container):
    def __init__(self, viewer, on_remove):
        self.image = _layer_combo(viewer, Image, "image", raw_only=True)
        self.points = _layer_combo(viewer, Points, "points")
        self.area = _layer_combo(viewer, Shapes, "area", nullable=True,
                                 tooltip="optional Shapes layer: rectangles around the parts where you marked every "
                                         "spot; only they are trained on (empty: the whole image is annotated)")
        self.remove = PushButton(text="x", tooltip="remove this pair")
        self.remove.max_width = 30
        super().__init__(widgets=[self.image, self.points, self.area, self.remove], layout="horizontal",
                         labels=False)
        self.margins = (0, 0, 0, 0)
        self.remove.changed.connect(lambda *_: on_remove(self))
        self.image.changed.connect(self._match_points)
        self._match_points()

    def _match_points(self, *_):
        """Pre-selects the Points layer whose name starts with the image's name (e.g. "<image> spots")."""
        image = self.image.value
        if image is None:
            return
        base = _source_name(image)
        for layer in self.points.choices:
            if layer.name.startswith(base):
                self.points.value = layer
                return


class TrainWidget(Container):
    """Fine-tune the current model on image layers paired with the Points layers that annotate them
    (drawn by hand, or Detect's result corrected); the fine-tuned model becomes the current one."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer = _unwrap(napari_viewer)
        self.holder = current_model(napari_viewer)
        self.model_panel = ModelPanel(self.holder)
        self.pairs = Container(widgets=[], labels=False, label="pairs")
        self.pairs.margins = (0, 0, 0, 0)
        self.add_pair_button = PushButton(text="Add pair (image + its Points layer)")
        self.epochs = SpinBox(label="epochs", value=DEFAULT_EPOCHS, min=1, max=10000,
                              tooltip="at most this many epochs; training stops early when the validation loss has "
                                      f"not improved for {DEFAULT_PATIENCE} epochs")
        self.batch_size = SpinBox(label="batch size", value=DEFAULT_TRAINING_BATCH_SIZE, min=1, max=256)
        self.learning_rate = LineEdit(label="learning rate", value=f"{DEFAULT_LEARNING_RATE:g}")
        self.validation_split = FloatSpinBox(label="validation split", value=DEFAULT_VALIDATION_SPLIT, min=0.0,
                                              max=0.9, step=0.05,
                                              tooltip="held out for validation (early stopping on its loss; its "
                                                      "detection F1 is shown too): a strip along one edge of "
                                                      "each annotated image or area, or whole images when 5 or "
                                                      "more are annotated")
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.save_path = FileEdit(label="save as", mode="w", filter="*.safetensors")
        self.save_button = PushButton(text="Save model")
        super().__init__(widgets=[self.model_panel, Label(value="Image layer -> Points layer annotating it:"),
                                  self.pairs, self.add_pair_button, self.epochs, self.batch_size,
                                  self.learning_rate, self.validation_split,
                                  Container(widgets=[self.train_button, self.cancel_button], layout="horizontal",
                                            labels=False),
                                  self.status, self.save_path, self.save_button])
        self.plot = LossPlot()
        self.native.layout().insertWidget(self.native.layout().count() - 2, self.plot)
        self.task: Task | None = None
        self.history: dict[str, list[float]] = {}
        _watch_layers(napari_viewer, self)
        self.add_pair_button.changed.connect(lambda *_: self.add_pair())
        self.train_button.changed.connect(self.train)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(self.save)
        self.add_pair()

    def add_pair(self, image: Image | None = None, points: Points | None = None) -> _PairRow:
        row = _PairRow(self.viewer, self._remove_pair)
        self.pairs.append(row)
        if image is not None:
            row.image.value = image
        if points is not None:
            row.points.value = points
        return row

    def _remove_pair(self, row) -> None:
        self.pairs.remove(row)

    def selected_pairs(self) -> list[tuple[Image, Points]]:
        return [(row.image.value, row.points.value, row.area.value) for row in self.pairs]

    def cancel(self, *_):
        if self.task is not None and self.task.running:
            self.task.cancel()

    def _learning_rate(self) -> float:
        try:
            return float(str(self.learning_rate.value).strip())
        except ValueError:
            raise UserError(f"learning rate '{self.learning_rate.value}' is not a number "
                            f"(e.g. {DEFAULT_LEARNING_RATE:g})") from None

    @_guarded("Train")
    def train(self, *_):
        """Fine-tunes a copy of the current model on the chosen pairs (Model.fit, in a worker, with
        live loss / F1); when it ends the copy becomes the current model of every widget."""
        if self.task is not None and self.task.running:
            raise UserError("a training is already running: cancel it first")
        images, points, regions = training_pairs(self.selected_pairs())
        learning_rate = self._learning_rate()
        epochs, batch_size = int(self.epochs.value), int(self.batch_size.value)
        validation_split = float(self.validation_split.value)
        check_fit_options(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                          validation_split=validation_split)  # fit's rules, before the run starts
        holder = self.holder
        base = holder.label
        trainee = holder.copy()  # Enhance and Detect keep the current model meanwhile
        run_dir = Path(tempfile.mkdtemp(prefix="deepspot-training-"))
        _TRAINING_DIRS.append(run_dir)
        self._run_dir = run_dir
        self.history = {}
        self.plot.set_history({})

        def work(report, cancelled, publish):
            with warnings.catch_warnings():
                # shown once training ends (show_warning belongs to the GUI thread); History keeps them
                warnings.simplefilter("ignore", IncompleteAnnotationWarning)
                return trainee.fit(images, points, regions=regions, epochs=epochs, batch_size=batch_size,
                                   learning_rate=learning_rate, validation_split=validation_split, progress=report,
                                   cancel=cancelled, on_epoch=publish, checkpoint_dir=run_dir, resume=False)

        def done(history):
            self._show_history(history)
            for message in history.warnings:
                show_warning(f"DeepSpot: {message}")
            best = run_dir / "best.safetensors"
            # the trained (best) weights are the current model now; their file is the run's best
            # checkpoint until Save model copies it where the user wants it
            holder.set(trainee, f"fine-tuned from {base.split(' fine-tuned from ')[-1]}",
                       path=best if best.is_file() else trainee.path, unsaved=True)
            _remove_training_dirs(keep=holder.path)
            self.status.value = self._summary() or "trained"
            show_info(f"DeepSpot: the fine-tuned model is now the current model ({len(images)} image(s)); "
                      "save it to keep it")

        self.status.value = f"training on {len(images)} image(s) ..."
        self.task = Task("Training DeepSpot", work, on_partial=self._show_history, on_result=done,
                         on_end=self._ended)
        self.train_button.enabled = False
        self.cancel_button.enabled = True

    def _summary(self) -> str:
        last = {k: v[-1] for k, v in self.history.items() if v and k in dict(LossPlot.SERIES)}
        text = "  ".join(f"{k} {v:.4g}" for k, v in last.items() if math.isfinite(v))
        epochs = self.history.get("epoch")
        return f"epoch {int(epochs[-1])}: {text}" if epochs else text

    def _show_history(self, history) -> None:
        """Accepts Model.fit's History, the per-epoch dict of on_epoch (latest values), a dict of
        lists or a list of per-epoch dicts."""
        if history is None:
            return
        if hasattr(history, "to_dict"):
            history = history.to_dict()
        if isinstance(history, (list, tuple)):
            merged: dict[str, list[float]] = {}
            for entry in history:
                for k, v in dict(entry).items():
                    merged.setdefault(k, []).append(v)
            history = merged
        keys = set(dict(LossPlot.SERIES)) | {"epoch"}
        for key, value in dict(history).items():
            if key not in keys:
                continue
            if isinstance(value, (list, tuple, np.ndarray)):
                self.history[key] = [float(v) for v in value]
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                self.history.setdefault(key, []).append(float(value))
        self.plot.set_history({k: v for k, v in self.history.items() if k in dict(LossPlot.SERIES)})
        summary = self._summary()
        if summary:
            self.status.value = summary

    def _ended(self) -> None:
        if self.task is not None and self.task.outcome != "done":
            _remove_training_dirs(keep=self.holder.path)
        if self.task is not None and self.task.outcome == "cancelled":
            self.status.value = "cancelled: the current model is unchanged"
        try:
            self.train_button.enabled = True
            self.cancel_button.enabled = False
        except RuntimeError:
            pass

    @_guarded("Save model")
    def save(self, *_):
        """Writes the current model's weights (e.g. just fine-tuned) to the chosen .safetensors file."""
        path = _chosen_file(self.save_path.value, "choose a file name to save the model to (the 'save as' field)")
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        holder = self.holder
        source = holder.path if holder.path is not None else bundled_weights_path(holder.bundled)
        if not Path(source).is_file():
            raise UserError(f"the current model's weights file {source} is gone; train again or load weights")
        if path.resolve() != Path(source).resolve():
            write_bytes(path, Path(source).read_bytes())  # atomic
        holder.set(holder.get(), path.name, path=path, unsaved=False)
        show_info(f"DeepSpot model saved to {path}")


_TRAINING_DIRS: list[Path] = []


@atexit.register
def _remove_training_dirs(keep: Path | None = None) -> None:
    """Each training run checkpoints into a temporary folder (Save model copies what is kept):
    removes them all but the one holding `keep`."""
    for folder in list(_TRAINING_DIRS):
        if keep is not None and Path(keep).parent == folder:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        _TRAINING_DIRS.remove(folder)
