#!/usr/bin/env python3
"""Make the TensorFlow golden outputs the C core is tested against: ``tests/data/golden_tf.npz``.

Usage::

    python tools/make_golden.py [--wheel PATH] [--out tests/data/golden_tf.npz]

What is stored (``np.load(path)``; no pickles):

* ``input_<i>``  the raw input image, 2-D, in its original dtype (uint8 or uint16);
* ``output_<i>`` float32 (1, H, W, 1): the ORIGINAL published model (napari-deepspot 0.0.7, MHybrid) run
  by TensorFlow on ``input.astype(float32) / float32(input.max())`` (per-image max scaling, float32
  division), batch 1, inference mode;
* ``names``      one string per input: where it came from (file, crop / z-plane, size, dtype);
* ``info``       a JSON string: TF version, flags, scaling, how each output was computed, the checks run;
* the intermediate activations of input 0 (NHWC float32) -- ``intermediate_concat`` (after the CASO
  concat, 32x32x384), ``intermediate_block01`` (after trunk block 1, 32x32x128), ``intermediate_up1``
  (after decoder up-block 1, incl. its final ReLU, 64x64x128) -- in the same file, or in
  ``golden_tf_intermediate.npz`` next to it when they would push the main file over ~6 MB.

Determinism: the script forces ``TF_ENABLE_ONEDNN_OPTS=0`` (plain Eigen kernels; TF's oneDNN
rewrites reorder floating-point sums) and runs every image alone (batch 1).

Inputs (``names`` has the exact crops): 0-3 the authors' simulated images 1-4.png (256x256 uint8);
4-7 real 256x256 uint16 crops (HybISS tissue, two telomeric-RNA nuclei crops, U-FISH cells); 8 the
whole z-plane 15 of the synthetic 3-D stack, 128x128 uint16 (the stack is only 128x128 per plane; the
model's output there is nearly saturated at 0 -- 46% of pixels are exactly 0.0 -- so compare with an
absolute tolerance); 9 a 128x192 uint16 crop (U-FISH).  TF with oneDNN on and ONNX Runtime differ from
these outputs by up to ~3e-6.

Non-256 inputs: the SavedModel's serving signature is fixed at (None, 256, 256, 1) and TF 2.4 baked
the 12 Conv2DTranspose output sizes into the graph as constants.  We run the SavedModel's own (flat)
inference function with just those 12 ``input_sizes`` tensors re-bound to sizes computed from the
input shape (``OriginalGraph`` in ``tools/convert_reference_weights.py``): the same ops and weights,
so the same model at any size that is a multiple of 8.  It must be bit-identical to the serving
signature at 256x256, and it is cross-checked (to 1e-6; observed: 0) against ``rebuilt_forward``, an
independent re-implementation of the architecture with raw TF ops that reads
``weights/deepspot_hybrid.safetensors`` (which also validates the weight conversion end to end).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # must precede the TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

TOOLS = Path(__file__).resolve().parent
REPO_ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import convert_reference_weights as crw  # noqa: E402

REALDATA = Path(os.environ.get("DEEPSPOT_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))
MAX_MAIN_BYTES = 6 * 1024 * 1024
TOL_REBUILT = 1e-6

# Intermediate activations: (key, tensor in the SavedModel's inference function).
INTERMEDIATES = (
    ("intermediate_concat", "mirnet/concatenate/concat:0"),
    ("intermediate_block01", "mirnet/add/add:0"),
    ("intermediate_up1", "mirnet/activation_50/Relu:0"),
)


# ------------------------------------------------------------------------------------------ inputs

def load_inputs() -> list[tuple[str, np.ndarray]]:
    """(description, raw 2-D array) for every golden input, in a fixed order."""
    from PIL import Image
    import tifffile

    items: list[tuple[str, np.ndarray]] = []
    sim = REALDATA / "deepspot_authors_sim" / "original"
    for i in (1, 2, 3, 4):
        a = np.array(Image.open(sim / f"{i}.png"))
        items.append((f"deepspot_authors_sim/original/{i}.png full 256x256 uint8 (authors' simulator)", a))

    un = REALDATA / "unannotated"
    # (file, row0, col0, rows, cols, z) -- crops chosen to contain spots (see report / README).
    crops = (
        ("spotiflow_img_hybiss_2d.tif", 128, 128, 256, 256, None),  # centre of the tissue image
        ("spotiflow_img_terra_2d.tif", 440, 360, 256, 256, None),   # a nucleus with telomeric foci
        ("spotiflow_img_terra_2d.tif", 64, 640, 256, 256, None),    # another nucleus, dark surround
        ("ufish_sample1.tif", 256, 128, 256, 256, None),            # dense cell cluster
        ("spotiflow_img_synth_3d.tif", 0, 0, 128, 128, 15),         # z-plane 15 of 32: only 128x128
        ("ufish_sample1.tif", 16, 320, 128, 192, None),             # non-square, non-256 crop
    )
    for fname, r0, c0, h, w, z in crops:
        a = tifffile.imread(un / fname)
        if z is not None:
            a = a[z]
        crop = np.ascontiguousarray(a[r0:r0 + h, c0:c0 + w])
        assert crop.shape == (h, w), (fname, crop.shape)
        where = f"z={z} " if z is not None else ""
        items.append((f"unannotated/{fname} {where}rows {r0}:{r0 + h} cols {c0}:{c0 + w} "
                      f"{h}x{w} {crop.dtype}", crop))
    for desc, a in items:
        if a.ndim != 2 or a.max() <= 0:
            raise ValueError(f"bad input {desc}: shape {a.shape}, max {a.max()}")
    return items


def scale(raw: np.ndarray) -> np.ndarray:
    """The reference input scaling: divide by the image's own maximum (float32), shape (1, H, W, 1)."""
    x = raw.astype(np.float32) / np.float32(raw.max())
    return x[None, :, :, None]


# ------------------------------------------------------------------------------------------ rebuilt

def rebuilt_forward(t: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Independent TF re-implementation of the architecture from the safetensors tensors ``t``.

    Mirrors the ops Keras 2.4 emitted (FusedBatchNormV3, eps 1e-3; 'SAME' convs; dilated convs through
    tf.nn.convolution; Conv2DBackpropInput with a 2H x 2W output).  Returns the output and the
    intermediates under the same keys as the npz.
    """
    import tensorflow as tf

    def conv(h, name, stride=1, dilation=1):
        w = tf.constant(t[f"{name}.weight"].transpose(2, 3, 1, 0))  # [out,in,kh,kw] -> (kh,kw,in,out)
        y = tf.nn.convolution(h, w, strides=stride, padding="SAME", dilations=dilation)
        return tf.nn.bias_add(y, t[f"{name}.bias"])

    def convt(h, name, stride):
        w = tf.constant(t[f"{name}.weight"].transpose(2, 3, 0, 1))  # [out,in,kh,kw] -> (kh,kw,out,in)
        shape = tf.shape(h)
        out = [shape[0], shape[1] * stride, shape[2] * stride, w.shape[2]]
        y = tf.nn.conv2d_transpose(h, w, tf.stack(out), strides=stride, padding="SAME")
        return tf.nn.bias_add(y, t[f"{name}.bias"])

    def bn(h, name):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            h, t[f"{name}.gamma"], t[f"{name}.beta"], t[f"{name}.moving_mean"], t[f"{name}.moving_variance"],
            epsilon=1e-3, is_training=False)
        return y

    def pool(h):
        return tf.nn.max_pool2d(h, 3, 2, "SAME")

    x = tf.constant(x)
    paths = []
    for path in ("strided", "maxpool", "atrous"):
        h = x
        for i in (1, 2, 3):
            if path == "strided":
                h = tf.nn.relu(bn(conv(h, f"caso.strided.conv{i}", stride=2), f"caso.strided.bn{i}"))
            else:
                d = 2 if path == "atrous" else 1
                h = pool(tf.nn.relu(bn(conv(h, f"caso.{path}.conv{i}", dilation=d), f"caso.{path}.bn{i}")))
        paths.append(h)
    h = tf.concat(paths, axis=-1)
    res = {"intermediate_concat": h}
    for b in range(1, 14):
        p = f"trunk.block{b:02d}"
        m = h
        for i in (1, 2, 3):
            m = conv(tf.nn.relu(bn(m, f"{p}.bn{i}")), f"{p}.conv{i}")
        short = bn(conv(h, f"{p}.shortcut.conv"), f"{p}.shortcut.bn") if b == 1 else h
        h = m + short
        if b == 1:
            res["intermediate_block01"] = h
    for j in (1, 2, 3):
        p = f"decoder.up{j}"
        m = tf.nn.relu(bn(convt(h, f"{p}.convt1", 2), f"{p}.bn1"))
        m = tf.nn.relu(bn(convt(m, f"{p}.convt2", 1), f"{p}.bn2"))
        m = bn(convt(m, f"{p}.convt3", 1), f"{p}.bn3")
        h = tf.nn.relu(m + bn(convt(h, f"{p}.shortcut.convt", 2), f"{p}.shortcut.bn"))
        if j == 1:
            res["intermediate_up1"] = h
    res["output"] = tf.sigmoid(conv(h, "head.conv"))
    return {k: v.numpy() for k, v in res.items()}


def load_safetensors_np(path: Path) -> dict[str, np.ndarray]:
    """Tiny reader for the checks here (the product's reader is the strict one in C)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: np.frombuffer(raw[base + v["data_offsets"][0]: base + v["data_offsets"][1]], "<f4").reshape(v["shape"])
            for k, v in header.items()}


# ------------------------------------------------------------------------------------------ main

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help=f"path to {crw.WHEEL_NAME} (default: cache, else pip download)")
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "data" / "golden_tf.npz"))
    ap.add_argument("--weights", default=str(REPO_ROOT / "weights" / "deepspot_hybrid.safetensors"),
                    help="converted weights used by the independent cross-check")
    args = ap.parse_args(argv)

    tf = crw.quiet_tensorflow()
    sm_dir = crw.reference_savedmodel_dir(args.wheel)
    model = crw.load_savedmodel(sm_dir)
    original = crw.OriginalGraph(model, [name for _, name in INTERMEDIATES])
    weights = load_safetensors_np(Path(args.weights))

    items = load_inputs()
    arrays: dict[str, np.ndarray] = {}
    engines, checks = [], []
    for i, (desc, raw) in enumerate(items):
        x = scale(raw)
        outs = original(x)
        y, inter = outs[0], dict(zip([k for k, _ in INTERMEDIATES], outs[1:]))
        if raw.shape == (256, 256):
            y_serv = original.serving(x)
            d = float(np.abs(y_serv - y).max())
            if d != 0.0:
                raise RuntimeError(f"input {i}: re-bound graph differs from the serving signature by {d}")
            y = y_serv
            engines.append("SavedModel serving_default signature (re-bound graph identical)")
        else:
            engines.append("SavedModel inference function with re-bound Conv2DTranspose sizes")
        rb = rebuilt_forward(weights, x)
        d_out = float(np.abs(rb["output"] - y).max())
        d_int = {k: float(np.abs(rb[k] - inter[k]).max()) for k in inter}
        checks.append({"input": i, "max_abs_rebuilt_vs_original": d_out, "intermediates": d_int})
        print(f"[{i}] {desc}: out range [{y.min():.4g}, {y.max():.4g}], |rebuilt-original| {d_out:.3g}, "
              + ", ".join(f"{k[13:]} {v:.3g}" for k, v in d_int.items()))
        if d_out > TOL_REBUILT:
            raise RuntimeError(f"input {i}: rebuilt forward differs from the original by {d_out}")
        assert y.dtype == np.float32 and y.shape == (1, *raw.shape, 1)
        arrays[f"input_{i}"] = raw
        arrays[f"output_{i}"] = y
        if i == 0:
            intermediates = {k: v.astype(np.float32) for k, v in inter.items()}

    info = {
        "model": f"{crw.PACKAGE_SPEC} MHybrid (wheel sha256 {crw.WHEEL_SHA256})",
        "tensorflow": tf.__version__,
        "TF_ENABLE_ONEDNN_OPTS": os.environ["TF_ENABLE_ONEDNN_OPTS"],
        "scaling": "x = input.astype(float32) / float32(input.max()); NHWC (1,H,W,1); batch 1; inference mode",
        "engines": engines,
        "checks": checks,
        "intermediates": {k: f"input_0, tensor {n}" for k, n in INTERMEDIATES},
    }
    arrays["names"] = np.array([d for d, _ in items])
    arrays["info"] = np.array(json.dumps(info))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    combined = npz_bytes({**arrays, **intermediates})
    if len(combined) <= MAX_MAIN_BYTES:
        out.write_bytes(combined)
        print(f"wrote {out} ({len(combined)} bytes, intermediates included)")
    else:
        side = out.with_name(out.stem + "_intermediate.npz")
        info["intermediates_file"] = side.name
        arrays["info"] = np.array(json.dumps(info))
        main_bytes = npz_bytes(arrays)
        side_bytes = npz_bytes({**intermediates, "names": arrays["names"][:1], "info": arrays["info"]})
        out.write_bytes(main_bytes)
        side.write_bytes(side_bytes)
        print(f"wrote {out} ({len(main_bytes)} bytes) and {side} ({len(side_bytes)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
