"""A picture of what was found: the image at a useful contrast with its spots marked and a legend
that counts them (`deepspot run/detect --overlay`, `deepspot demo`)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

DETECTION_COLOUR = (255, 40, 40)
TRUTH_COLOUR = (0, 255, 0)
CONTRAST_PERCENTILES = (0.5, 99.8)  # a few hot pixels or a dark border do not set the contrast
MAX_ENLARGED_SIDE = 1024  # images up to this side are drawn at twice their size, so that markers stay small
LEGEND_ROW_PX = 18


def legend_lines(found: np.ndarray, truth: np.ndarray | None = None) -> list[str]:
    lines = [f"red crosses: {len(found)} spots detected"]
    if truth is not None:
        lines.insert(0, f"green circles: {len(truth)} ground-truth spots")
    return lines


def _yx(points) -> np.ndarray:
    """(n, 2) y, x of (y, x) or (z, y, x) points: a stack's spots land on its projection."""
    points = np.asarray(points, np.float64)
    return points[:, -2:] if points.size else np.zeros((0, 2))


def contrast_stretch(plane: np.ndarray) -> np.ndarray:
    """uint8 grey of a 2D image stretched between its CONTRAST_PERCENTILES."""
    plane = np.asarray(plane, np.float32)
    low, high = np.percentile(plane, CONTRAST_PERCENTILES)
    return (np.clip((plane - low) / max(high - low, 1e-9), 0, 1) * 255).astype(np.uint8)


def draw_overlay(image: np.ndarray, found: np.ndarray, path: str | Path, truth: np.ndarray | None = None) -> None:
    """Writes an RGB PNG (atomically): a 2D image, or a stack's maximum projection, stretched between
    CONTRAST_PERCENTILES; the detections (coordinates whose last two columns are y, x) as red crosses,
    the ground truth (if given) as green circles; below it a legend with the counts, also stored as
    the PNG's "legend" text."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo
    from .io import write_bytes
    image = np.asarray(image, np.float32)
    plane = image.max(axis=tuple(range(image.ndim - 2))) if image.ndim > 2 else image
    grey = contrast_stretch(plane)
    scale = 2 if max(grey.shape) <= MAX_ENLARGED_SIDE else 1
    height, width = grey.shape[0] * scale, grey.shape[1] * scale
    lines = legend_lines(found, truth)
    text_width = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line) for line in lines)
    canvas = Image.new("RGB", (max(width, int(text_width) + 12), height + LEGEND_ROW_PX * len(lines) + 4))  # legend whole
    canvas.paste(Image.fromarray(grey).convert("RGB").resize((width, height), Image.NEAREST))
    draw = ImageDraw.Draw(canvas)
    radius, arm = 3.5 * scale, 2 * scale
    for y, x in _yx(truth if truth is not None else ()) * scale + scale / 2:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=TRUTH_COLOUR)
    for y, x in _yx(found) * scale + scale / 2:
        draw.line([x - arm, y, x + arm, y], fill=DETECTION_COLOUR)
        draw.line([x, y - arm, x, y + arm], fill=DETECTION_COLOUR)
    for row, line in enumerate(lines):
        colour = TRUTH_COLOUR if line.startswith("green") else DETECTION_COLOUR
        draw.text((6, height + 3 + row * LEGEND_ROW_PX), line, fill=colour)
    info = PngInfo()
    info.add_text("legend", "; ".join(lines))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", pnginfo=info)
    write_bytes(Path(path), buffer.getvalue())
