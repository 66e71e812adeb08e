#!/usr/bin/env python3
"""What a napari user waits for after moving to another plane of a large stack, with "Enhance plane in
view" on (issue 13): a real napari viewer (headless under Xvfb), a 16-plane 2048x2048 stack, the canvas
zoomed so that it shows 512x512 pixels of it.

    python benchmarks/bench_view_first.py [--precision float32 bf16] [--planes 16] [--size 2048]

For each precision, in one run:
* to an uncached plane, the model idle: time from the plane change to the first enhanced pixels of the
  view in the layer, and to the whole plane cached;
* to an uncached plane while the prefetch of another plane is still running (that work is cancelled
  first);
* to a cached (prefetched) plane: time for napari to take the plane change (re-slicing both layers and
  our handler), and our handler alone.
Medians over the planes visited. Needs napari with a Qt binding, and Xvfb without $DISPLAY.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
sys.path.insert(0, str(HERE))
from checkout import import_package  # noqa: E402
from virtual_display import start_xvfb  # noqa: E402

VIEW_PX = 512


def timed_handler(widget) -> float:
    """Seconds of the widget's own plane-change handler on the plane in view (cached: nothing to start)."""
    start = time.perf_counter()
    widget._dims_changed()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["float32", "bf16"])
    parser.add_argument("--planes", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    import_package()
    why = start_xvfb("1600x1000x24")
    if why:
        sys.exit(f"bench_view_first: {why}")
    os.environ.setdefault("QT_API", "pyqt6")
    import napari
    from qtpy.QtWidgets import QApplication

    from deepspot_napari._widgets import EnhanceWidget
    from deepspot_napari.simulate import simulate_image

    rng = np.random.default_rng(0)
    tile = np.stack([simulate_image(rng, "ds_var", n_spots=60, size=256)[0] for _ in range(4)])
    reps = args.size // 256
    stack = np.stack([np.block([[tile[(p + i + j) % 4] for j in range(reps)] for i in range(reps)])
                      for p in range(args.planes)]).astype(np.uint16)
    app = QApplication.instance() or QApplication([])

    def pump(until, timeout=600.0):
        start = time.perf_counter()
        while not until():
            app.processEvents()
            time.sleep(0.002)
            if time.perf_counter() - start > timeout:
                raise TimeoutError("timed out")
        return time.perf_counter() - start

    rows = []
    for precision in args.precision:
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1400, 900)
        viewer.add_image(stack, name="stack")
        widget = EnhanceWidget(viewer)
        viewer.window.add_dock_widget(widget, area="right")
        widget.holder.load(None, precision=precision)
        pump(lambda: True)
        for _ in range(20):
            app.processEvents()
        height, width = viewer.window._qt_viewer.canvas.size
        centre = args.size / 2
        viewer.camera.center = (0, centre, centre)
        viewer.camera.zoom = min(height, width) / VIEW_PX
        view = (slice(int(centre - VIEW_PX / 2) + 8, int(centre + VIEW_PX / 2) - 8),) * 2
        viewer.dims.set_current_step(0, 0)
        widget.in_view.value = True
        out = viewer.layers["stack enhanced"]
        state = out.metadata["deepspot"]
        pump(lambda: (0,) in state["done"] and (1,) in state["done"] and not widget.plane_task.running)
        idle_first, idle_whole, busy_first, cached, handler = [], [], [], [], []
        # planes 2, 7, 12, ...: uncached, everything idle; then plane + 1, cached by its prefetch; then
        # plane + 3, uncached, moved to while the prefetch of plane + 2 runs (plane + 3's own prefetch then
        # takes plane + 4, so that plane + 5 is uncached again)
        for plane in range(2, args.planes - 3, 5):
            pump(lambda: not widget.plane_task.running)
            start = time.perf_counter()
            viewer.dims.set_current_step(0, plane)
            pump(lambda: out.data[plane][view].all())
            idle_first.append(time.perf_counter() - start)
            pump(lambda: (plane,) in state["done"])
            idle_whole.append(time.perf_counter() - start)
            pump(lambda: (plane + 1,) in state["done"] and not widget.plane_task.running)
            start = time.perf_counter()
            viewer.dims.set_current_step(0, plane + 1)
            app.processEvents()
            cached.append(time.perf_counter() - start)
            handler.append(timed_handler(widget))
            pump(lambda: widget.plane_task.running or (plane + 2,) in state["done"])  # plane + 2's prefetch
            target = plane + 3
            start = time.perf_counter()
            viewer.dims.set_current_step(0, target)  # away from the plane being prefetched
            pump(lambda: out.data[target][view].all())
            busy_first.append(time.perf_counter() - start)
        model = widget.holder.get()
        rows.append((f"{precision} ({model.precision})", idle_first, idle_whole, busy_first, cached, handler))
        widget.in_view.value = False
        widget.cancel()
        pump(lambda: not widget.plane_task.running)
        viewer.close()

    print(f"{args.planes} planes of {args.size}x{args.size}, the canvas showing {VIEW_PX}x{VIEW_PX} pixels; "
          "median (max) seconds over the planes visited\n")
    print("| precision | plane change -> first pixels of the view (idle) | -> whole plane cached | first pixels "
          "while a prefetch runs | plane change to a cached plane (napari + ours) | ours alone |")
    print("|---|---|---|---|---|---|")
    for label, *series in rows:
        cells = [f"{statistics.median(v):.3f} ({max(v):.3f})" for v in series]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
