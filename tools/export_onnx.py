#!/usr/bin/env python3
"""Convert the original DeepSpot SavedModel (napari-deepspot 0.0.7, MHybrid) to ONNX with tf2onnx.

Usage::

    python tools/export_onnx.py [OUTPUT.onnx] [--dynamic-hw] [--opset 17] [--wheel PATH]

Why: the inference benchmark compares our C/oneDNN core with the frameworks a user could otherwise run
the published model in -- TensorFlow and ONNX Runtime (``benchmarks/bench_reference_frameworks.py``).
The ONNX file is a derived artefact: it goes into a cache folder (default
``~/.cache/deepspot-napari/onnx/``) and is never committed.

* Default: the serving signature, input ``input`` float32 (batch, 256, 256, 1) NHWC, output ``output``
  (batch, 256, 256, 1); the batch dimension is dynamic.
* ``--dynamic-hw``: the SavedModel's own inference graph re-bound to any H, W multiple of 8
  (``OriginalGraph`` in ``tools/convert_reference_weights.py``), weights frozen in; input
  (batch, height, width, 1).

After writing, the file is checked: ONNX Runtime (CPU) vs TensorFlow on one real input (and, for
``--dynamic-hw``, on a 128x192 input too) must agree within 1e-4; the check is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO_ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import convert_reference_weights as crw  # noqa: E402

DEFAULT_OPSET = 17
TOLERANCE = 1e-4


def default_onnx_path(dynamic_hw: bool = False) -> Path:
    name = "deepspot_mhybrid_dynamic_hw.onnx" if dynamic_hw else "deepspot_mhybrid_256.onnx"
    return crw.cache_dir() / "onnx" / name


def _name_dims(model, names: list[str]) -> None:
    """Give the dynamic dimensions readable names (tf2onnx calls them unk__NNN)."""
    for value in (*model.graph.input, *model.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if not dim.HasField("dim_value"):
                dim.dim_param = name


def _check_input() -> np.ndarray:
    """One real image scaled as the model expects: the golden file's first input if present."""
    golden = REPO_ROOT / "tests" / "data" / "golden_tf.npz"
    if golden.is_file():
        raw = np.load(golden)["input_0"]
    else:
        from PIL import Image

        realdata = Path(os.environ.get("DEEPSPOT_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))
        raw = np.array(Image.open(realdata / "deepspot_authors_sim" / "original" / "1.png"))
    return (raw.astype(np.float32) / np.float32(raw.max()))[None, :, :, None]


def export(path: str | os.PathLike | None = None, dynamic_hw: bool = False, opset: int = DEFAULT_OPSET,
           wheel: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Write the ONNX model to ``path`` (default: cache folder), verify it, return the path."""
    tf = crw.quiet_tensorflow()
    import tf2onnx

    path = Path(path) if path else default_onnx_path(dynamic_hw)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = crw.load_savedmodel(crw.reference_savedmodel_dir(wheel))
    signature = model.signatures["serving_default"]
    if dynamic_hw:
        graph = crw.OriginalGraph(model, freeze=True)
        spec = (tf.TensorSpec([None, None, None, 1], tf.float32, name="input"),)

        @tf.function(input_signature=spec)
        def fn(x):
            return {"output": graph.function(x)[0]}
    else:
        spec = (tf.TensorSpec([None, 256, 256, 1], tf.float32, name="input"),)

        @tf.function(input_signature=spec)
        def fn(x):
            return {"output": signature(input_1=x)["conv2d"]}

    onnx_model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    _name_dims(onnx_model, ["batch", "height", "width"])
    onnx_model.doc_string = (f"DeepSpot MHybrid from {crw.PACKAGE_SPEC} (wheel sha256 {crw.WHEEL_SHA256}); "
                             f"MIT (c) 2021 Emmanuel Bouilhol; converted with tf2onnx {tf2onnx.__version__}, "
                             f"TF {tf.__version__}; input NHWC float32 scaled by the image max")
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(onnx_model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {path} ({path.stat().st_size} bytes, opset {opset}, "
          f"{'dynamic batch/H/W' if dynamic_hw else 'dynamic batch, 256x256'})")

    if verify:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = _check_input()
        checks = [("256x256 real image", x, signature(input_1=tf.constant(x))["conv2d"].numpy())]
        if dynamic_hw:
            x2 = np.ascontiguousarray(x[:, 64:192, 32:224, :])
            x2 = x2 / x2.max()
            checks.append(("128x192 crop", x2, crw.OriginalGraph(model)(x2)[0]))
        for what, xi, ref in checks:
            y = sess.run(None, {"input": xi})[0]
            diff = float(np.abs(y - ref).max())
            ok = y.shape == ref.shape and diff <= TOLERANCE
            print(f"check {what}: ONNX Runtime {ort.__version__} vs TensorFlow {tf.__version__}: "
                  f"max |diff| = {diff:.3g} (tolerance {TOLERANCE:g}) -> {'OK' if ok else 'FAIL'}")
            if not ok:
                raise RuntimeError(f"ONNX export check failed on {what}: max |diff| {diff}, shapes {y.shape} {ref.shape}")
    return path


def ensure_onnx(dynamic_hw: bool = False) -> Path:
    """The cached ONNX file, exported (and verified) on first use."""
    path = default_onnx_path(dynamic_hw)
    if not path.is_file():
        export(path, dynamic_hw=dynamic_hw)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", nargs="?", help="output .onnx (default: %s)" % default_onnx_path())
    ap.add_argument("--dynamic-hw", action="store_true", help="dynamic height/width too (multiples of 8)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--wheel", help=f"path to {crw.WHEEL_NAME} (default: cache, else pip download)")
    args = ap.parse_args(argv)
    export(args.output, dynamic_hw=args.dynamic_hw, opset=args.opset, wheel=args.wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
