"""napari widget: Polarity (npe2 contribution, see napari.yaml): where the RNA goes in each cell.

Like the other widgets it holds no analysis: it reads a Points layer (the spots), a Labels layer of cells
and one of nuclei (or segments nuclei from a DAPI image layer with polarity.segment_nuclei) and the wound
(a Shapes layer: a line along the wound edge, or a shape around the wound; a Points layer: a clicked
point; or an angle), calls polarity.measure_cells / group_polarity, and shows the results: a table per
cell, a Labels layer with each cytoplasm's sections (1 = toward the wound), and the paper's figure.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox,
                              Table)
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_info, show_warning
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import QLabel

from . import polarity
from ._widgets import UserError, _checked_image, _full_resolution, _guarded, _layer_combo, _unwrap, _watch_layers

ANGLE = "angle below"  # the wound choice that means: use the angle field


def wound_from_layer(layer) -> dict:
    """measure_cells' direction argument from a Shapes layer (its first shape: a line/path is the wound
    edge, a closed shape's outline too) or a Points layer (its first point, in the wound)."""
    if isinstance(layer, Points):
        if len(layer.data) == 0:
            raise UserError(f"Points layer '{layer.name}' is empty: click a point in the wound")
        return dict(towards=np.asarray(layer.data[0], np.float64)[-2:])
    if isinstance(layer, Shapes):
        if layer.nshapes == 0:
            raise UserError(f"Shapes layer '{layer.name}' is empty: draw a line along the wound edge")
        vertices = np.asarray(layer.data[0], np.float64)[:, -2:]
        if layer.shape_type[0] not in ("line", "path"):
            vertices = np.concatenate([vertices, vertices[:1]])  # closed outline
        return dict(wound=vertices)
    raise UserError("the wound must be a Shapes layer (a line along the wound edge) or a Points layer (a point in it)")


class PolarityWidget(Container):
    """Spots per section toward a wound, per cell, and DypFISH's polarity index of the cells."""

    def __init__(self, napari_viewer):
        self.viewer = napari_viewer = _unwrap(napari_viewer)
        self.spots = _layer_combo(napari_viewer, Points, "spots")
        self.cells = _layer_combo(napari_viewer, Labels, "cells",
                                  tooltip="a Labels layer: one label per cell (whole cells, nuclei inside)")
        self.nuclei = _layer_combo(napari_viewer, Labels, "nuclei", tooltip="a Labels layer: one label per nucleus")
        self.compartments = ComboBox(label="cells are", choices=list(polarity.COMPARTMENTS), value="whole",
                                     tooltip="whole: whole cells, nuclei inside; cytoplasm: cytoplasm only, nucleus k "
                                             "belongs to cell k")
        self.dapi = _layer_combo(napari_viewer, Image, "DAPI image", nullable=True,
                                 tooltip="a nucleus stain, to segment nuclei from (Otsu threshold and watershed)")
        self.segment_button = PushButton(text="Segment nuclei from the DAPI image")

        def wound_choices(_widget=None):
            return [(ANGLE, ANGLE)] + [(layer.name, layer) for layer in napari_viewer.layers
                                       if isinstance(layer, (Shapes, Points)) and layer is not self.spots.value]
        self.wound = ComboBox(label="wound", choices=wound_choices,
                              tooltip="a Shapes layer (a line along the wound edge), a Points layer (a point in "
                                      "the wound) or the angle below")
        self.angle = FloatSpinBox(label="angle (deg)", value=90.0, min=-360.0, max=360.0, step=5.0,
                                  tooltip="the wound's direction: 0 = right, 90 = up on screen")
        self.sections = SpinBox(label="sections", value=polarity.DEFAULT_SECTIONS, min=polarity.SECTIONS_RANGE[0],
                                max=polarity.SECTIONS_RANGE[1])
        self.rotate = CheckBox(text="rotate sections to the densest (DypFISH)", value=False)
        self.run_button = PushButton(text="Analyse polarity")
        self.status = Label(value="")
        self.table = Table()
        self.figure = QLabel()
        self.save_folder = FileEdit(label="save to", mode="d")
        self.save_button = PushButton(text="Save cells.csv, summary.csv, polarity.png", enabled=False)
        super().__init__(widgets=[self.spots, self.cells, self.nuclei, self.compartments, self.dapi,
                                  self.segment_button, self.wound, self.angle, self.sections, self.rotate,
                                  self.run_button, self.status, self.table, self.save_folder, self.save_button])
        self.native.layout().insertWidget(self.native.layout().count() - 2, self.figure)
        self.result: tuple | None = None
        _watch_layers(napari_viewer, self)
        self.segment_button.changed.connect(self.segment)
        self.run_button.changed.connect(self.analyse)
        self.save_button.changed.connect(self.save)

    @_guarded("Segment nuclei")
    def segment(self, *_):
        layer = _checked_image(self.dapi.value, "DAPI image")
        data = np.asarray(_full_resolution(layer))
        if data.ndim != 2:
            raise UserError(f"layer '{layer.name}' has shape {data.shape}; segmenting nuclei needs a 2D image")
        labels = polarity.segment_nuclei(data)
        name = f"{layer.name} nuclei"
        if name in self.viewer.layers:
            self.viewer.layers[name].data = labels
        else:
            self.viewer.add_labels(labels, name=name, scale=layer.scale[-2:], translate=layer.translate[-2:])
        self.nuclei.value = self.viewer.layers[name]
        show_info(f"DeepSpot: {labels.max()} nuclei segmented; check them before the analysis")

    def _inputs(self):
        spots, cells, nuclei = self.spots.value, self.cells.value, self.nuclei.value
        if spots is None or cells is None or nuclei is None:
            raise UserError("choose the spots (a Points layer), the cells and the nuclei (Labels layers); "
                            "nuclei can be segmented from a DAPI image")
        cell_data, nucleus_data = np.asarray(cells.data), np.asarray(nuclei.data)
        if cell_data.shape != nucleus_data.shape:
            raise UserError(f"cells '{cells.name}' {cell_data.shape} and nuclei '{nuclei.name}' {nucleus_data.shape} "
                            "must have the same shape")
        where = dict(angle=self.angle.value) if self.wound.value == ANGLE else wound_from_layer(self.wound.value)
        return np.asarray(spots.data), cell_data, nucleus_data, where

    @_guarded("Polarity")
    def analyse(self, *_):
        points, cells, nuclei, where = self._inputs()
        table = polarity.measure_cells(points, cells, nuclei, sections=self.sections.value, rotate=self.rotate.value,
                                       compartments=self.compartments.value, section_map=True, **where)
        for message in table.messages[:5]:
            show_warning(f"Polarity: {message}")
        if len(table.messages) > 5:
            show_warning(f"Polarity: {len(table.messages) - 5} more messages (see the status column of cells.csv)")
        overlay = f"{self.cells.value.name} sections"
        if overlay in self.viewer.layers:
            self.viewer.layers[overlay].data = table.section_map
        else:
            self.viewer.add_labels(table.section_map, name=overlay, opacity=0.4, scale=self.cells.value.scale,
                                   translate=self.cells.value.translate)
        rows = table.rows()
        columns = list(dict.fromkeys(c for row in rows for c in row))
        self.table.value = {c: [row.get(c, "") for row in rows] for c in columns}
        name = self.spots.value.name
        group = polarity.group_polarity(name, [table]) if len(table.labels) else None
        self.result = ({name: [(name, table)]}, [group] if group else [])
        self.save_button.enabled = True
        if group is None:
            self.status.value = "no cell could be measured (see the messages)"
            self.figure.clear()
            return
        p = group.polarity
        self.status.value = (f"{p.n_cells} cells: polarity index {p.index:.2f} +- {p.error:.2f} "
                             f"(95% over cells {p.interval[0]:.2f}..{p.interval[1]:.2f}), p = {p.pvalue:.2g}")
        buffer = io.BytesIO()
        polarity.polarity_figure([group]).savefig(buffer, format="png")
        pixmap = QPixmap()
        pixmap.loadFromData(buffer.getvalue(), "PNG")
        self.figure.setPixmap(pixmap.scaledToWidth(420))

    @_guarded("Save polarity")
    def save(self, *_):
        if self.result is None:
            raise UserError("analyse first")
        value = self.save_folder.value
        if value is None or str(value) in ("", "."):
            raise UserError("choose a folder to save to (the 'save to' field)")
        written = polarity.write_results(Path(value).expanduser(), *self.result)
        show_info(f"DeepSpot: wrote {', '.join(p.name for p in written)} to {Path(value).expanduser()}")
