#!/usr/bin/env python3
"""Convert the published DeepSpot weights (napari-deepspot 0.0.7, TF SavedModel "MHybrid") to safetensors.

Usage::

    python tools/convert_reference_weights.py [--wheel PATH] [--out weights/deepspot_hybrid.safetensors]

Without ``--wheel`` the wheel is fetched with ``pip download --no-deps napari-deepspot==0.0.7`` into a
temporary folder.  The wheel's sha256 must match the one recorded below (the PyPI release file).

Why this exists: the C/oneDNN core (``csrc/model.c``) reads descriptive tensor names in PyTorch-like
layouts from a safetensors file, with no TensorFlow at run time.  This script is the only place where
the Keras names/layouts are translated; ``weights/README.md`` documents the scheme.

Layouts written (all float32):

* Conv2D          Keras (kh, kw, in, out)  -> ``<name>.weight`` [out, in, kh, kw]   (transpose 3,2,0,1)
* Conv2DTranspose Keras (kh, kw, out, in)  -> ``<name>.weight`` [out, in, kh, kw]   (transpose 2,3,0,1),
  where ``out`` is the channel count of the transposed conv's OUTPUT; no spatial flip.
* biases ``<name>.bias`` [out]; BatchNorm ``<bn>.{gamma,beta,moving_mean,moving_variance}`` [channels].

The module also holds the helpers the other reference tools share (``tools/make_golden.py``,
``tools/export_onnx.py``, ``benchmarks/bench_reference_frameworks.py``): fetching the wheel, extracting
the SavedModel into a cache folder, loading it with current TensorFlow, and ``OriginalGraph`` (the
SavedModel's own graph made to accept sizes other than 256x256).

Loading quirk: the SavedModel was written by TF 2.4.1 / Keras 2.4 with the Adam optimizer state
included.  TF >= 2.16 (Keras 3) revives that optimizer as a plain object and ``tf.saved_model.load``
fails with ``'_UserObject' object has no attribute 'add_slot'``.  We therefore load a private copy
whose object graph has the optimizer *slot references* removed (``strip_optimizer_slots``); the
checkpoint data is untouched and the model weights restore exactly (the Adam moments are just not
restored, which inference never needs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

PACKAGE_SPEC = "napari-deepspot==0.0.7"
WHEEL_NAME = "napari_DeepSpot-0.0.7-py3-none-any.whl"
WHEEL_SHA256 = "b77f099744135e4dcbb32aa4cc7eb05308df5ede07f679cc36456415ece81b1b"
SAVEDMODEL_IN_WHEEL = "napari_deepspot/models/MHybrid/"

EXPECTED_PARAMS = 4_037_249
EXPECTED_LAYERS = 123
FORMAT = "deepspot-napari/1"
ARCHITECTURE = "deepspot-reference"
LICENCE = (
    "MIT. Weights from napari-DeepSpot 0.0.7, Copyright (c) 2021 Emmanuel Bouilhol "
    "(E. Bouilhol et al., DeepSpot, Biological Imaging 2022); see weights/LICENSE-deepspot-weights.txt"
)
SOURCE = (
    f"PyPI {PACKAGE_SPEC}, wheel {WHEEL_NAME} (sha256 {WHEEL_SHA256}), "
    f"TF SavedModel {SAVEDMODEL_IN_WHEEL.rstrip('/')}; github ebouilhol/napari-DeepSpot, cbib/DeepSpot"
)

TRUNK_LETTERS = "abcdefghijklm"  # res3a .. res3m -> trunk.block01 .. block13
DECODER_LETTERS = "abc"  # up_res6a .. up_res6c -> decoder.up1 .. up3
BRANCH2 = {"a": 1, "b": 2, "c": 3}


# --------------------------------------------------------------------------------------------- paths

def cache_dir() -> Path:
    """~/.cache/deepspot-napari (or $DEEPSPOT_NAPARI_CACHE, or $XDG_CACHE_HOME/deepspot-napari)."""
    env = os.environ.get("DEEPSPOT_NAPARI_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepspot-napari"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(dest_dir: str | os.PathLike) -> Path:
    """``pip download --no-deps napari-deepspot==0.0.7`` into dest_dir; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE_SPEC,
           "-d", os.fspath(dest_dir)]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheel = Path(dest_dir) / WHEEL_NAME
    if not wheel.is_file():
        found = sorted(Path(dest_dir).glob("*.whl"))
        if len(found) != 1:
            raise RuntimeError(f"pip download did not produce {WHEEL_NAME} in {dest_dir}: {found}")
        wheel = found[0]
    return wheel


def check_wheel(wheel: str | os.PathLike) -> str:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel}: sha256 {digest} differs from the recorded {PACKAGE_SPEC} wheel ({WHEEL_SHA256})")
    return digest


def strip_optimizer_slots(savedmodel_dir: str | os.PathLike) -> int:
    """Remove optimizer slot-variable references from saved_model.pb (see module docstring).

    Returns the number of slot references removed.  Only the object graph is edited.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    pb = Path(savedmodel_dir) / "saved_model.pb"
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(pb.read_bytes())
    removed = 0
    for meta_graph in sm.meta_graphs:
        for node in meta_graph.object_graph_def.nodes:
            removed += len(node.slot_variables)
            del node.slot_variables[:]
    pb.write_bytes(sm.SerializeToString())
    return removed


def extract_savedmodel(wheel: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract napari_deepspot/models/MHybrid from the wheel into dest (created) and strip the slots."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(SAVEDMODEL_IN_WHEEL) and not m.endswith("/")]
        if not any(m.endswith("saved_model.pb") for m in members):
            raise RuntimeError(f"{wheel} has no {SAVEDMODEL_IN_WHEEL}saved_model.pb")
        for m in members:
            rel = m[len(SAVEDMODEL_IN_WHEEL):]
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    strip_optimizer_slots(dest)
    return dest


def reference_savedmodel_dir(wheel: str | os.PathLike | None = None) -> Path:
    """A loadable (slot-stripped) copy of MHybrid in the cache folder, created on first use.

    Uses ``wheel`` if given, else ``pip download``s the release into a temporary folder.
    """
    root = cache_dir() / "reference"
    target = root / f"MHybrid-0.0.7-{WHEEL_SHA256[:12]}"
    if (target / "saved_model.pb").is_file() and (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if wheel is None:
            wheel = download_wheel(tmp)
        check_wheel(wheel)
        staged = extract_savedmodel(wheel, Path(tmp) / "MHybrid")
        (staged / ".complete").write_text(WHEEL_SHA256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


# --------------------------------------------------------------------------------------------- loading

def quiet_tensorflow():
    """Import TensorFlow with its C++ and Python logging turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


def load_savedmodel(savedmodel_dir: str | os.PathLike):
    """tf.saved_model.load of a slot-stripped copy (returns the revived object)."""
    tf = quiet_tensorflow()  # also hides the expected "value not restored" warnings (Adam moments)
    return tf.saved_model.load(os.fspath(savedmodel_dir))


def keras_model_config(savedmodel_dir: str | os.PathLike) -> dict:
    """The Keras functional-model config stored in the SavedModel's object-graph metadata."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(savedmodel_dir) / "saved_model.pb").read_bytes())
    root = sm.meta_graphs[0].object_graph_def.nodes[0]
    meta = json.loads(root.user_object.metadata)
    return meta["config"]


def reference_variables(model) -> dict[str, np.ndarray]:
    """{'conv1/kernel': array, ...} for every variable of the revived model (':0' dropped)."""
    out: dict[str, np.ndarray] = {}
    for v in model.variables:
        name = v.name[:-2] if v.name.endswith(":0") else v.name
        if name in out:
            raise RuntimeError(f"duplicate variable name {name}")
        out[name] = v.numpy()
    return out


class OriginalGraph:
    """The SavedModel's own inference function, re-bound to accept any H, W that are multiples of 8.

    The serving signature is fixed at (None, 256, 256, 1), and TF 2.4 baked the output sizes of the 12
    Conv2DTranspose layers into the graph as constants (``mirnet/<layer>/stack``, a Pack of batch, H, W,
    C).  Everything else in the flat inference function is size-agnostic for H, W multiples of 8 (the
    dilated convs' SpaceToBatchND paddings [[2,2],[2,2]] are right for every even size).  We import the
    function's graph with those 12 tensors re-bound to sizes computed from the input's shape: same ops,
    same weights.  ``make_golden.py`` checks it is bit-identical to the serving signature at 256x256.

    ``self.function`` is a concrete function of one float32 (N, H, W, 1) tensor returning
    ``[output, *extra_tensors]``; ``__call__(x)`` runs it on a numpy array.
    """

    def __init__(self, model, extra_tensors=(), freeze=False):
        tf = quiet_tensorflow()
        from tensorflow.python.framework import function_def_to_graph

        self.signature = model.signatures["serving_default"]
        outer = self.signature.graph
        gdef = outer.as_graph_def()
        calls = [n for n in gdef.node if n.op == "StatefulPartitionedCall"]
        if len(calls) != 1 or len(gdef.library.function) != 1:
            raise RuntimeError("unexpected SavedModel layout: expected one flat inference function")
        fdef = gdef.library.function[0]
        inner_gdef = function_def_to_graph.function_def_to_graph(fdef).as_graph_def()
        capture_by_name = {internal.name.split(":")[0]: ext for ext, internal in outer.captures}
        arg_source = dict(zip([a.name for a in fdef.signature.input_arg], calls[0].input))
        image_arg = [a for a, src in arg_source.items() if src == "input_1"][0]
        out_tensor = fdef.ret[fdef.signature.output_arg[0].name].split(":")[0] + ":0"
        consts = {n.name: n for n in fdef.node_def if n.op == "Const"}

        # freeze=True: every ReadVariableOp becomes a Const holding the variable's value and the resource
        # placeholders go away, so the graph has no captures (what tf2onnx needs).  Grappler then
        # folds/fuses differently, so results move by ~1 ulp; freeze=False keeps the variables and is
        # bit-identical to the serving signature.
        frozen = type(inner_gdef)()
        frozen.versions.CopyFrom(inner_gdef.versions)
        frozen.library.CopyFrom(inner_gdef.library)
        n_frozen = 0
        for node in inner_gdef.node if freeze else ():
            if node.op == "Placeholder" and node.name != image_arg:
                continue  # a resource argument
            new = frozen.node.add()
            new.CopyFrom(node)
            if node.op == "ReadVariableOp":
                handle = capture_by_name[arg_source[node.input[0]]]
                value = tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32).numpy()
                new.op = "Const"
                del new.input[:]
                new.attr.clear()
                new.attr["dtype"].type = tf.float32.as_datatype_enum
                new.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
                n_frozen += 1
        if freeze and n_frozen != len(capture_by_name):
            raise RuntimeError(f"froze {n_frozen} variables, expected {len(capture_by_name)}")

        stacks = []  # (tensor name, decoder level 1..3, channels)
        for node in fdef.node_def:
            if node.op == "Conv2DBackpropInput":
                layer = node.name.split("/")[1]  # up_res6{a,b,c}_branch...
                level = "abc".index(layer[len("up_res6")]) + 1  # output H is input H * 2**level / 8
                channels = int(tf.make_ndarray(consts[f"mirnet/{layer}/stack/3"].attr["value"].tensor))
                stacks.append((node.input[0].split(":")[0] + ":0", level, channels))
        if len(stacks) != 12:
            raise RuntimeError(f"expected 12 transposed convs, found {len(stacks)}")

        graph_def = frozen if freeze else inner_gdef

        def body(x):
            shape = tf.shape(x)
            n, h, w = shape[0], shape[1], shape[2]
            input_map = {f"{image_arg}:0": x}
            if not freeze:
                graph = tf.compat.v1.get_default_graph()
                for arg, src in arg_source.items():
                    if arg != image_arg:
                        input_map[f"{arg}:0"] = graph.capture(capture_by_name[src])
            for name, level, c in stacks:
                f = 2 ** level
                input_map[name] = tf.stack([n, h * f // 8, w * f // 8, tf.constant(c)])
            return tf.graph_util.import_graph_def(
                graph_def, input_map=input_map, return_elements=[out_tensor, *extra_tensors], name="g")

        self.function = tf.compat.v1.wrap_function(body, [tf.TensorSpec([None, None, None, 1], tf.float32)])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        h, w = x.shape[1:3]
        if h % 8 or w % 8:
            raise ValueError(f"H and W must be multiples of 8, got {h}x{w}")
        return [t.numpy() for t in self.function(x)]

    def serving(self, x: np.ndarray) -> np.ndarray:
        """The untouched serving signature (256x256 only)."""
        tf = quiet_tensorflow()
        return self.signature(input_1=tf.constant(x))["conv2d"].numpy()


# --------------------------------------------------------------------------------------------- naming

def descriptive_name(keras_layer: str) -> str:
    """Keras layer name -> descriptive tensor prefix (see weights/README.md)."""
    n = keras_layer
    for prefix, path in (("conv_maxpool", "maxpool"), ("conv_atrou", "atrous"), ("conv", "strided")):
        if n.startswith(prefix) and n[len(prefix):].isdigit():
            return f"caso.{path}.conv{int(n[len(prefix):])}"
    for prefix, path in (("bn_maxpool", "maxpool"), ("bn_atrou", "atrous"), ("bn_conv", "strided")):
        if n.startswith(prefix) and n[len(prefix):].isdigit():
            return f"caso.{path}.bn{int(n[len(prefix):])}"
    if n == "conv2d":
        return "head.conv"
    for kind, stem in (("conv", "res3"), ("bn", "bn3")):
        if n.startswith(stem) and n[len(stem):len(stem) + 1] in tuple(TRUNK_LETTERS):
            block = TRUNK_LETTERS.index(n[len(stem)]) + 1
            branch = n[len(stem) + 1:]
            if branch == "_branch1" and block == 1:
                return f"trunk.block01.shortcut.{kind}"
            if branch.startswith("_branch2") and branch[-1] in BRANCH2:
                return f"trunk.block{block:02d}.{kind}{BRANCH2[branch[-1]]}"
    for kind, stem in (("convt", "up_res6"), ("bn", "up_bn6")):
        if n.startswith(stem) and n[len(stem):len(stem) + 1] in tuple(DECODER_LETTERS):
            up = DECODER_LETTERS.index(n[len(stem)]) + 1
            branch = n[len(stem) + 1:]
            if branch == "_branch1":
                return f"decoder.up{up}.shortcut.{kind}"
            if branch in ("_branch2a", "_branch2b", "_branch2c"):
                return f"decoder.up{up}.{kind}{BRANCH2[branch[-1]]}"
    raise KeyError(f"no descriptive name for Keras layer {keras_layer!r}")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the architecture (docs/reference_model.md) with its shape,
    derived independently of the SavedModel so the conversion is cross-checked."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out, cin, k):
        shapes[f"{name}.weight"] = (out, cin, k, k)
        shapes[f"{name}.bias"] = (out,)

    def bn(name, c):
        for p in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"{name}.{p}"] = (c,)

    filters = (32, 64, 128)
    for path in ("strided", "maxpool", "atrous"):
        for i, f in enumerate(filters):
            conv(f"caso.{path}.conv{i + 1}", f, filters[i - 1] if i else 1, 3)
            bn(f"caso.{path}.bn{i + 1}", f)
    for b in range(1, 14):
        cin = 384 if b == 1 else 128
        bn(f"trunk.block{b:02d}.bn1", cin)
        conv(f"trunk.block{b:02d}.conv1", 128, cin, 1)
        bn(f"trunk.block{b:02d}.bn2", 128)
        conv(f"trunk.block{b:02d}.conv2", 128, 128, 3)
        bn(f"trunk.block{b:02d}.bn3", 128)
        conv(f"trunk.block{b:02d}.conv3", 128, 128, 1)
    conv("trunk.block01.shortcut.conv", 128, 384, 1)
    bn("trunk.block01.shortcut.bn", 128)
    up = {1: (128, (256, 128, 128)), 2: (128, (128, 64, 64)), 3: (64, (64, 32, 32))}
    for j, (cin, fs) in up.items():
        for i, f in enumerate(fs):
            conv(f"decoder.up{j}.convt{i + 1}", f, fs[i - 1] if i else cin, 3)
            bn(f"decoder.up{j}.bn{i + 1}", f)
        conv(f"decoder.up{j}.shortcut.convt", fs[1], cin, 3)
        bn(f"decoder.up{j}.shortcut.bn", fs[1])
    conv("head.conv", 1, 32, 1)
    return shapes


def convert(variables: dict[str, np.ndarray], model_config: dict) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
    """Map Keras variables to descriptive names/layouts.

    Returns (tensors, mapping) where mapping lists (keras_layer, class_name, descriptive_prefix) in
    the Keras layer order.  Raises if any variable is left over or any check fails.
    """
    tensors: dict[str, np.ndarray] = {}
    mapping: list[tuple[str, str, str]] = []
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in variables:
            raise KeyError(f"variable {key} missing from the SavedModel")
        if key in used:
            raise KeyError(f"variable {key} used twice")
        used.add(key)
        arr = variables[key]
        if arr.dtype != np.float32:
            raise TypeError(f"{key}: dtype {arr.dtype}, expected float32")
        return arr

    for layer in model_config["layers"]:
        cls, lname = layer["class_name"], layer["config"]["name"]
        if cls not in ("Conv2D", "Conv2DTranspose", "BatchNormalization"):
            continue
        name = descriptive_name(lname)
        mapping.append((lname, cls, name))
        if cls == "BatchNormalization":
            for p in ("gamma", "beta", "moving_mean", "moving_variance"):
                tensors[f"{name}.{p}"] = np.ascontiguousarray(take(f"{lname}/{p}"))
            continue
        kernel = take(f"{lname}/kernel")
        if cls == "Conv2D":  # (kh, kw, in, out) -> (out, in, kh, kw)
            weight = kernel.transpose(3, 2, 0, 1)
        else:  # Conv2DTranspose (kh, kw, out, in) -> (out, in, kh, kw), no flip
            weight = kernel.transpose(2, 3, 0, 1)
        if weight.shape[0] != layer["config"]["filters"]:
            raise ValueError(f"{lname}: {weight.shape[0]} output channels, config says {layer['config']['filters']}")
        tensors[f"{name}.weight"] = np.ascontiguousarray(weight)
        tensors[f"{name}.bias"] = np.ascontiguousarray(take(f"{lname}/bias"))

    leftover = sorted(set(variables) - used)
    if leftover:
        raise ValueError(f"variables not mapped: {leftover}")
    if len(mapping) != EXPECTED_LAYERS:
        raise ValueError(f"{len(mapping)} weighted layers, expected {EXPECTED_LAYERS}")
    total = sum(int(a.size) for a in tensors.values())
    if total != EXPECTED_PARAMS:
        raise ValueError(f"{total} values, expected {EXPECTED_PARAMS}")
    want = expected_shapes()
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ValueError(f"tensor names/shapes differ from the architecture: {diff[:10]}")
    for k, v in tensors.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{k} has NaN/Inf")
    return tensors, mapping


def load_safetensors_writer():
    """``deepspot_napari.safetensors_io.save_safetensors``, loaded from its file on purpose.

    Importing the ``deepspot_napari`` package would load its C core (oneDNN + GNU OpenMP) into this
    TensorFlow process, which crashes TF (segfault while loading the SavedModel).  The writer module
    itself depends on numpy only.
    """
    import importlib.util

    path = REPO_ROOT / "deepspot_napari" / "safetensors_io.py"
    spec = importlib.util.spec_from_file_location("_deepspot_safetensors_io", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_safetensors


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help=f"path to {WHEEL_NAME} (default: pip download {PACKAGE_SPEC})")
    ap.add_argument("--out", default=str(REPO_ROOT / "weights" / "deepspot_hybrid.safetensors"),
                    help="output safetensors file (default: %(default)s)")
    ap.add_argument("--print-mapping", action="store_true", help="print the Keras -> descriptive name table")
    args = ap.parse_args(argv)

    save_safetensors = load_safetensors_writer()

    with tempfile.TemporaryDirectory(prefix="deepspot-convert-") as tmp:
        wheel = Path(args.wheel) if args.wheel else download_wheel(tmp)
        digest = check_wheel(wheel)
        print(f"wheel {wheel} sha256 {digest}", file=sys.stderr)
        sm_dir = extract_savedmodel(wheel, Path(tmp) / "MHybrid")
        config = keras_model_config(sm_dir)
        model = load_savedmodel(sm_dir)
        variables = reference_variables(model)
        tensors, mapping = convert(variables, config)

    if args.print_mapping:
        for lname, cls, name in mapping:
            print(f"{lname:22s} {cls:20s} -> {name}")
    metadata = {
        "format": FORMAT,
        "architecture": ARCHITECTURE,
        "source": SOURCE,
        "licence": LICENCE,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, tensors, metadata)
    total = sum(int(a.size) for a in tensors.values())
    print(f"wrote {out}: {len(tensors)} tensors, {len(mapping)} layers, {total} values, "
          f"{out.stat().st_size} bytes, sha256 {sha256_file(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
