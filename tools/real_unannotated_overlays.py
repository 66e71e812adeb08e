"""docs/accuracy/real_unannotated_models.png: detections of two models (default detection) and of
Big-FISH's automatic LoG on the real unannotated images, a 256x256 crop each (red circles), with the
whole-image counts printed and written beside the figure (real_unannotated_counts.md).

    python3 tools/real_unannotated_overlays.py --weights RUN/best.safetensors --compare hybrid [--realdata DIR]
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspot_napari import Model  # noqa: E402
from deepspot_napari.evaluate import BIGFISH_SPOT_RADIUS_PX, Sample, bigfish_method  # noqa: E402
from deepspot_napari.io import read_image, write_bytes  # noqa: E402
from deepspot_napari.overlay import contrast_stretch  # noqa: E402
from deepspot_napari.realistic_eval import default_realdata  # noqa: E402

CROPS = {"spotiflow_img_hybiss_2d.tif": (128, 128), "ufish_sample1.tif": (128, 128),
         "spotiflow_img_terra_2d.tif": (384, 384)}


def panel(crop, coords, title):
    img = Image.fromarray(contrast_stretch(crop)).convert("RGB").resize((512, 512), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for y, x in coords * 2 + 1:
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(255, 60, 60))
    draw.rectangle([0, 0, 511, 18], fill=(0, 0, 0))
    draw.text((6, 4), title, fill=(255, 255, 0))
    return img


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="the model to show (a file or a bundled name)")
    parser.add_argument("--compare", default="hybrid")
    parser.add_argument("--realdata", type=Path, default=default_realdata())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "accuracy")
    args = parser.parse_args()
    models = [Model.load(args.weights), Model.load(args.compare)]
    bigfish = bigfish_method(BIGFISH_SPOT_RADIUS_PX)
    rows, grid = [], []
    for name, (y0, x0) in CROPS.items():
        image = np.asarray(read_image(args.realdata / "unannotated" / name))
        found = [m.detect(image).coords for m in models] + [bigfish.detect(Sample(name, image, np.zeros((0, 2))), None)]
        labels = [m.path.stem.replace("deepspot_", "DeepSpot ") for m in models] + ["Big-FISH auto LoG"]
        rows.append((name, image.shape, [len(f) for f in found]))
        crop = image[y0:y0 + 256, x0:x0 + 256].astype(np.float32)
        line = []
        for coords, label in zip(found, labels):
            inside = np.all((coords >= [y0, x0]) & (coords < [y0 + 256, x0 + 256]), axis=1)
            line.append(panel(crop, coords[inside] - [y0, x0], f"{label}: {len(coords)} in the image, "
                                                              f"{int(inside.sum())} here ({name})"))
        grid.append(line)
    canvas = Image.new("RGB", (520 * 3 - 8, 520 * len(grid) - 8), "white")
    for r, line in enumerate(grid):
        for c, p in enumerate(line):
            canvas.paste(p, (c * 520, r * 520))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_bytes(args.out / "real_unannotated_models.png", buffer.getvalue())
    text = ["| image | size | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    text += [f"| {name} | {shape[0]}x{shape[1]} | " + " | ".join(map(str, counts)) + " |" for name, shape, counts in rows]
    write_bytes(args.out / "real_unannotated_counts.md", ("\n".join(text) + "\n").encode())
    print("\n".join(text))


if __name__ == "__main__":
    main()
