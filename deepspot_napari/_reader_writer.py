"""napari reader and writer for spot tables (npe2 contributions; no Qt needed).

Read:
  * our tables, as written by the `deepspot` CLI and Spots.to_csv: a header naming the coordinate
    columns `y,x` or `z,y,x` (any order), then optional columns (score, intensity, size, ...);
  * napari's own points CSV (`index,axis-0,axis-1[,axis-2...][,feature...]`, File > Save Layers);
  * the DeepSpot authors' ground truth: no header, two numeric columns `x,y`.
Every column that is not a coordinate becomes a feature of the Points layer.

Write: a Points layer of 2 or 3 dimensions as `y,x,...` / `z,y,x,...` followed by its features
(what the CLI writes); a layer of more dimensions (a time series of z-stacks) in napari's
`index,axis-0,...` layout, which this reader (and napari's) read back.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write

COORDINATE_NAMES = ("z", "y", "x")


def points_layer_kwargs(features: dict[str, np.ndarray], ndim: int, name: str | None = None) -> dict[str, Any]:
    """The look of a spots layer: points sized and coloured by `score` when there is one."""
    kwargs: dict[str, Any] = {"features": features, "ndim": ndim, "border_width": 0.0, "opacity": 0.9,
                              "symbol": "ring"}  # a ring keeps the spot itself visible
    if name is not None:
        kwargs["name"] = name
    score = features.get("score")
    n = 0 if not features else len(next(iter(features.values())))
    if score is not None and n > 0 and np.issubdtype(np.asarray(score).dtype, np.number):
        score = np.asarray(score, dtype=float)
        low, high = float(np.nanmin(score)), float(np.nanmax(score))
        relative = (score - low) / (high - low) if high > low else np.ones_like(score)
        kwargs.update(size=4.0 + 6.0 * np.nan_to_num(relative, nan=0.0), face_color="score",
                      face_colormap="viridis", face_contrast_limits=(low, high if high > low else low + 1.0))
    else:
        kwargs.update(size=6.0, face_color="#ff7f0e")
    return kwargs


def _header(path: str) -> list[str] | None:
    try:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if row and any(cell.strip() for cell in row):
                    return [cell.strip() for cell in row]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _layout(header: list[str]) -> str | None:
    """'napari', 'deepspot', 'authors' (headerless x,y) or None when this is not a spot table."""
    names = [h.lower() for h in header]
    if "axis-0" in names and "axis-1" in names:
        return "napari"
    if "y" in names and "x" in names:
        return "deepspot"
    if len(header) == 2 and all(_is_number(h) for h in header):
        return "authors"
    return None


def get_reader(path):
    """npe2 reader hook: a reader function for spot CSV files, None for anything else."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return None
    for p in paths:
        if not str(p).lower().endswith(".csv") or not os.path.isfile(p):
            return None
        header = _header(str(p))
        if header is None or _layout(header) is None:
            return None
    return read_spots


def _column(values: list[str]) -> np.ndarray:
    try:
        return np.array([float(v) for v in values], dtype=float)
    except ValueError:
        return np.array(values, dtype=object)


def read_spot_table(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(coords (n, ndim) in pixels, features column -> values) from a spot CSV file.

    Raises ValueError naming the file when it is not a spot table or a row is malformed."""
    path = str(path)
    with open(path, newline="") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f) if row and any(c.strip() for c in row)]
    if not rows:
        raise ValueError(f"{path}: empty file: expected a spot table with a header such as 'y,x' or 'z,y,x'")
    layout = _layout(rows[0])
    if layout is None:
        raise ValueError(f"{path}: not a spot table: the header {rows[0]} names neither y and x columns nor "
                         "napari's axis-0, axis-1")
    if layout == "authors":
        header, body = ["x", "y"], rows
    else:
        header, body = rows[0], rows[1:]
    for number, row in enumerate(body, start=1 if layout == "authors" else 2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {number}: {len(row)} values for {len(header)} columns")
    columns = {name: [row[i] for row in body] for i, name in enumerate(header)}
    lower = [h.lower() for h in header]
    if layout == "napari":
        axes = sorted((h for h in header if h.lower().startswith("axis-")), key=lambda h: int(h.split("-")[1]))
        skip = set(axes) | {h for h in header if h.lower() == "index"}
    else:
        axes = [header[lower.index(a)] for a in COORDINATE_NAMES if a in lower]
        skip = set(axes)
    try:
        coords = np.array([[float(v) for v in columns[a]] for a in axes], dtype=float).T.reshape(len(body), len(axes))
    except ValueError as exc:
        raise ValueError(f"{path}: a coordinate is not a number ({exc})") from None
    features = {name: _column(values) for name, values in columns.items() if name not in skip}
    return coords, features


def read_spots(path) -> list[tuple]:
    """npe2 reader function: one Points layer per file."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = []
    for p in paths:
        coords, features = read_spot_table(p)
        name = Path(p).name
        name = name[:-4] if name.lower().endswith(".csv") else name
        layers.append((coords, points_layer_kwargs(features, coords.shape[1], name=name), "points"))
    return layers


def _text(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if np.isfinite(value) else str(float(value))
    if isinstance(value, (np.integer, np.bool_)):
        return str(value.item())
    return str(value)


def write_points(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 writer: a Points layer as a spot CSV (see the module docstring). Atomic: an interrupted
    save leaves no half-written file. Returns the written path."""
    if not str(path).lower().endswith(".csv"):
        path = f"{path}.csv"
    coords = np.asarray(data, dtype=float)
    if coords.ndim != 2:
        coords = coords.reshape(0, 2)
    features = attributes.get("features")
    if features is None or len(getattr(features, "columns", [])) == 0:
        table = {name: np.asarray(values) for name, values in (attributes.get("properties") or {}).items()}
    else:
        table = {str(name): features[name].to_numpy() for name in features.columns}
    ndim = coords.shape[1]
    if ndim <= 3:
        header = list(COORDINATE_NAMES[-ndim:])
        leading: list[list] = []
    else:
        header = ["index"] + [f"axis-{i}" for i in range(ndim)]
        leading = [[i] for i in range(len(coords))]
    clash = [name for name in table if name in header]
    if clash:
        raise ValueError(f"cannot write {path}: feature column(s) {clash} clash with the coordinate columns")
    header += list(table)
    feature_columns = list(table.values())
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i, point in enumerate(coords):
            row = (leading[i] if leading else []) + [_text(v) for v in point]
            row += [_text(column[i]) for column in feature_columns]
            writer.writerow(row)
    return [str(path)]
