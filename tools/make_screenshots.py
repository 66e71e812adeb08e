#!/usr/bin/env python3
"""Screenshots of the napari plugin in use, for docs/napari.md: each widget docked in a real
napari window with its result (docs/screenshots/*.png, palette PNGs well under 300 KB).

    python tools/make_screenshots.py [--out docs/screenshots] [--only NAME ...]

Needs napari with a Qt binding (pip install 'deepspot-napari[napari]'). Without $DISPLAY it
starts its own Xvfb (apt-get install xvfb), stopped when this script has exited; `xvfb-run -a python
tools/make_screenshots.py` works too. Training screenshots need Model.fit (deepspot_napari/train.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from virtual_display import start_xvfb  # tools/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1500, 900)
MAX_BYTES = 300_000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=SHOTS, help="the screenshots to make (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))  # the checkout's package when it is not installed
    if "QT_API" not in os.environ and importlib.util.find_spec("PyQt6") is not None:
        os.environ["QT_API"] = "pyqt6"  # napari 0.9 shows a deprecation notice on PyQt5
    why_not = start_xvfb("1920x1200x24")
    if why_not:
        sys.exit(f"make_screenshots: {why_not}")
    return shoot(args.out, set(args.only))


SHOTS = ("enhance", "detect", "train", "polarity")


def shoot(out: Path, only=frozenset(SHOTS)) -> int:
    import napari
    from PIL import Image as PILImage
    from qtpy.QtWidgets import QApplication

    from deepspot_napari import Model
    from deepspot_napari._sample_data import make_sample_data
    from deepspot_napari._widgets import DetectWidget, EnhanceWidget, TrainWidget
    from deepspot_napari.simulate import simulate_image

    app = QApplication.instance() or QApplication([])

    def settle(seconds=0.3):
        end = time.time() + seconds
        while time.time() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait(owner, attribute, timeout=600):
        start = time.time()
        while getattr(owner, attribute) is None or getattr(owner, attribute).running:
            app.processEvents()
            time.sleep(0.02)
            if time.time() - start > timeout:
                raise TimeoutError(f"{attribute} did not finish")
        settle()
        task = getattr(owner, attribute)
        if task.outcome != "done":
            raise RuntimeError(f"{task.description}: {task.outcome} {task.error}")

    def save(viewer, name):
        settle(0.5)
        rgba = viewer.screenshot(canvas_only=False, flash=False)
        image = PILImage.fromarray(np.asarray(rgba)[..., :3])
        path = out / f"{name}.png"
        image.quantize(colors=160, method=PILImage.Quantize.MEDIANCUT, dither=PILImage.Dither.NONE).save(
            path, optimize=True)
        size = path.stat().st_size
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {image.size[0]}x{image.size[1]}, "
              f"{size // 1000} kB")
        if size > MAX_BYTES:
            raise RuntimeError(f"{path} is {size} bytes, over {MAX_BYTES}")

    def new_viewer(title):
        viewer = napari.Viewer(title=title, show=True)
        viewer.window._qt_window.resize(*WINDOW)
        return viewer

    def add_sample(viewer):
        for data, kwargs, kind in make_sample_data():
            getattr(viewer, f"add_{kind}")(data, **kwargs)

    if "enhance" in only:
        shoot_enhance(new_viewer, add_sample, wait, settle, save, EnhanceWidget, simulate_image)
    if "detect" in only:
        shoot_detect(new_viewer, add_sample, wait, save, DetectWidget)
    if "train" in only:
        shoot_train(new_viewer, add_sample, wait, save, TrainWidget, Model)
    if "polarity" in only:
        shoot_polarity(new_viewer, save)
    return 0


def shoot_enhance(new_viewer, add_sample, wait, settle, save, EnhanceWidget, simulate_image):
    # 1. Enhance a 2D image: raw and enhanced side by side
    viewer = new_viewer("DeepSpot - Enhance")
    add_sample(viewer)
    viewer.layers["smFISH sample: true spots"].visible = False
    enhance = EnhanceWidget(viewer)
    viewer.window.add_dock_widget(enhance, name="Enhance spots (deepspot-napari)", area="right")
    enhance.run_button.clicked.emit()
    wait(enhance, "all_task")
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 2)
    viewer.layers["smFISH sample: true spots"].visible = False
    viewer.layers.selection = {viewer.layers["smFISH sample enhanced"]}
    viewer.reset_view()
    save(viewer, "enhance_2d")

    # 2. A z-stack, plane in view enhanced on demand (planes appear as the slider moves)
    rng = np.random.default_rng(7)
    stack = np.stack([simulate_image(rng, "ds_var", n_spots=40, size=256)[0] for _ in range(12)])
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    viewer.grid.enabled = False
    viewer.add_image(stack, name="z-stack", colormap="gray")
    enhance.image.value = viewer.layers["z-stack"]
    viewer.dims.set_current_step(0, 4)
    enhance.in_view.value = True
    wait(enhance, "plane_task")
    viewer.dims.set_current_step(0, 5)
    settle(0.2)
    wait(enhance, "plane_task")
    viewer.layers["z-stack enhanced"].opacity = 0.85
    viewer.reset_view()
    save(viewer, "enhance_stack_in_view")
    viewer.close()


def shoot_detect(new_viewer, add_sample, wait, save, DetectWidget):
    # 3. Detect: points sized and coloured by score, the features table open
    viewer = new_viewer("DeepSpot - Detect")
    add_sample(viewer)
    viewer.layers["smFISH sample: true spots"].visible = False
    detect = DetectWidget(viewer)
    viewer.window.add_dock_widget(detect, name="Detect spots (deepspot-napari)", area="right")
    detect.run_button.clicked.emit()
    wait(detect, "task")
    viewer.layers["smFISH sample enhanced"].visible = False
    detect.table_button.clicked.emit()
    viewer.camera.center = (128, 128)
    viewer.camera.zoom = 2.4
    save(viewer, "detect")
    viewer.close()


def shoot_train(new_viewer, add_sample, wait, save, TrainWidget, Model):
    # 4. Train on annotated layers (the sample's true spots as the annotation)
    viewer = new_viewer("DeepSpot - Train")
    add_sample(viewer)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train on annotated layers (deepspot-napari)", area="right")
    if hasattr(Model, "fit"):
        # the sample paired with its true spots (picked automatically: the Points layer is named
        # after the image): 4 patches of 256 px, one of them kept for validation
        train.epochs.value, train.batch_size.value, train.validation_split.value = 8, 3, 0.25
        train.learning_rate.value = "1e-4"
        train.train_button.clicked.emit()
        wait(train, "task", timeout=900)
    else:
        print("Model.fit is not available: the train screenshot shows the widget before training")
    viewer.reset_view()
    save(viewer, "train")
    viewer.close()


def shoot_polarity(new_viewer, save):
    # 5. Polarity: simulated cells enriched toward a wound above them (docs/polarity.md)
    from deepspot_napari._polarity_widget import PolarityWidget
    from deepspot_napari.polarity import simulated_field
    field = simulated_field(0, enrichment=0.8)
    viewer = new_viewer("DeepSpot - Polarity")
    viewer.add_image(field["image"], name="smFISH", colormap="gray")
    viewer.add_image(field["dapi"], name="DAPI", colormap="blue", blending="additive", visible=False)
    viewer.add_points(field["spots"], name="spots", size=4, face_color="yellow", border_width=0)
    viewer.add_labels(field["cells"], name="cells", opacity=0.0)
    width = field["cells"].shape[1]
    viewer.add_shapes([np.array([[-2.0, 0.0], [-2.0, width - 1.0]])], shape_type="line", name="wound",
                      edge_color="red", edge_width=3)
    widget = PolarityWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Polarity (deepspot-napari)", area="right")
    widget.dapi.value = viewer.layers["DAPI"]
    widget.segment_button.clicked.emit()
    widget.spots.value = viewer.layers["spots"]
    widget.cells.value = viewer.layers["cells"]
    widget.wound.value = viewer.layers["wound"]
    widget.run_button.clicked.emit()
    viewer.layers["DAPI nuclei"].opacity = 0.3
    viewer.reset_view()
    save(viewer, "polarity")
    viewer.close()


if __name__ == "__main__":
    sys.exit(main())
