#!/usr/bin/env python3
"""Make the TensorFlow/Keras golden values of ONE training step: ``tests/data/golden_train_step.npz``.

Usage::

    python tools/make_train_golden.py [--out tests/data/golden_train_step.npz] [--compare]

The Keras model is built layer by layer as the authors' ``deepspot/network.py`` and
``deepspot/residual_blocks.py`` do (Keras 3 / ``tf.keras`` as installed; SpatialDropout2D rate 0, i.e.
dropout off), its weights set from ``weights/deepspot_hybrid.safetensors``, compiled as the authors'
``deepspot/train.py`` compiles it (Adam lr 1e-4, beta 0.9 / 0.999, epsilon 1e-7; loss = Keras
``BinaryCrossentropy()`` + (max y_pred - max y_true)^2 over the whole batch) and given one
``train_on_batch`` on a 2x64x64 batch of simulated images (``simulate_image(recipe="code", size=64)``)
with their targets (``make_target``, each divided by its own max, as the images).

What is stored (``np.load``; no pickles), small enough to commit (~1 MB):

* ``images``, ``targets``: uint8 [2, 64, 64], the raw batch (the test divides each by its own max);
* ``loss``: float64 scalar, the loss Keras reports for the step (the forward's, before the update);
* ``loss_logits_form``, ``loss_clipped_form``: the same loss computed here from the Keras model's logits
  in both BCE forms, to record which one Keras used (see ``info``);
* ``update/<name>``: int8 round(127 (after - before) / learning_rate) for every trainable tensor (the first
  Adam step moves each value by less than the learning rate, so this keeps the update to 0.4% of the
  learning rate, i.e. every value after the step to 4e-7);
* ``after/<name>``: float32 moving_mean / moving_variance of every BN after the step;
* ``grad/<name>``: float32 Keras gradients of every 1-D trainable tensor (biases, gamma, beta) and of the
  head's weight, for the report of how well the gradients themselves agree;
* ``info``: JSON string (TF/Keras versions, the BCE form Keras used, settings).

Which binary cross-entropy Keras computes for a sigmoid output inside ``fit``/``train_on_batch`` is
decided by a probe first (a 1x1 Conv2D with a sigmoid whose bias is -30, so p < 1e-7): Keras takes the
sigmoid's logits (``tf.nn.sigmoid_cross_entropy_with_logits``, no clipping) in graph mode; the clipped
``-(t log p + (1-t) log(1-p))`` form only applies to a plain probability tensor (e.g. eager).

Determinism: ``TF_ENABLE_ONEDNN_OPTS=0`` (plain Eigen kernels). With ``--compare`` the script also runs the
C core's trainer on the same batch and prints the agreement (needs the built extension).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))
from make_golden import load_safetensors_np  # noqa: E402

LEARNING_RATE = 1e-4
SIZE = 64
BATCH = 2
SEED = 20240611


def make_batch():
    from deepspot_napari.simulate import make_target, simulate_image
    rng = np.random.default_rng(SEED)
    images, targets = [], []
    for _ in range(BATCH):
        image, spots = simulate_image(rng, recipe="code", n_spots=12, size=SIZE)
        images.append(image)
        targets.append(make_target(image, spots))
    return np.stack(images), np.stack(targets)


def scale(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    return a / a.reshape(len(a), -1).max(axis=1)[:, None, None]


def build_keras_model(size: int, dropout_rate: float = 0.0):
    """The authors' architecture (network.py, residual_blocks.py) with our tensor names as layer names.
    Returns (model, {keras layer name: our name prefix})."""
    import keras
    from keras import layers

    names: dict[str, str] = {}

    def named(our: str) -> str:
        keras_name = our.replace(".", "_")
        names[keras_name] = our
        return keras_name

    def conv(x, our, filters, k, stride=1, dilation=1, activation=None):
        return layers.Conv2D(filters, (k, k), strides=(stride, stride), padding="same",
                             dilation_rate=(dilation, dilation), activation=activation, name=named(our))(x)

    def convt(x, our, filters, stride):
        return layers.Conv2DTranspose(filters, (3, 3), strides=(stride, stride), padding="same", name=named(our))(x)

    def bn(x, our):
        return layers.BatchNormalization(axis=3, name=named(our))(x)

    relu = layers.Activation("relu")
    x_in = keras.Input((size, size, 1))
    paths = []
    for path, filters in (("strided", None), ("maxpool", None), ("atrous", None)):
        h = x_in
        for i, f in enumerate((32, 64, 128), start=1):
            if path == "strided":
                h = layers.Activation("relu")(bn(conv(h, f"caso.strided.conv{i}", f, 3, stride=2), f"caso.strided.bn{i}"))
            else:
                d = 2 if path == "atrous" else 1
                h = layers.Activation("relu")(bn(conv(h, f"caso.{path}.conv{i}", f, 3, dilation=d), f"caso.{path}.bn{i}"))
                h = layers.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(h)
        paths.append(h)
    t = layers.Concatenate()(paths)
    for b in range(1, 14):
        p = f"trunk.block{b:02d}"
        h = t
        for i, k in ((1, 1), (2, 3), (3, 1)):
            h = layers.Activation("relu")(bn(h, f"{p}.bn{i}"))
            h = conv(h, f"{p}.conv{i}", 128, k)
        h = layers.SpatialDropout2D(dropout_rate)(h)
        shortcut = bn(conv(t, f"{p}.shortcut.conv", 128, 1), f"{p}.shortcut.bn") if b == 1 else t
        t = layers.Add()([h, shortcut])
    for j, filters in enumerate(((256, 128, 128), (128, 64, 64), (64, 32, 32)), start=1):
        p = f"decoder.up{j}"
        h = layers.Activation("relu")(bn(convt(t, f"{p}.convt1", filters[0], 2), f"{p}.bn1"))
        h = layers.Activation("relu")(bn(convt(h, f"{p}.convt2", filters[1], 1), f"{p}.bn2"))
        h = bn(convt(h, f"{p}.convt3", filters[2], 1), f"{p}.bn3")
        h = layers.SpatialDropout2D(dropout_rate)(h)
        shortcut = bn(convt(t, f"{p}.shortcut.convt", filters[1], 2), f"{p}.shortcut.bn")
        t = layers.Activation("relu")(layers.Add()([h, shortcut]))
    out = conv(t, "head.conv", 1, 1, activation="sigmoid")
    del relu
    return keras.Model(x_in, out, name="deepspot"), names


def set_weights(model, names, params):
    from keras import layers
    for layer in model.layers:
        our = names.get(layer.name)
        if our is None:
            continue
        if isinstance(layer, layers.Conv2DTranspose):
            layer.set_weights([params[our + ".weight"].transpose(2, 3, 0, 1), params[our + ".bias"]])
        elif isinstance(layer, layers.Conv2D):
            layer.set_weights([params[our + ".weight"].transpose(2, 3, 1, 0), params[our + ".bias"]])
        else:
            layer.set_weights([params[our + s] for s in (".gamma", ".beta", ".moving_mean", ".moving_variance")])


def get_weights(model, names):
    from keras import layers
    out = {}
    for layer in model.layers:
        our = names.get(layer.name)
        if our is None:
            continue
        w = layer.get_weights()
        if isinstance(layer, layers.Conv2DTranspose):
            out[our + ".weight"], out[our + ".bias"] = w[0].transpose(2, 3, 0, 1), w[1]
        elif isinstance(layer, layers.Conv2D):
            out[our + ".weight"], out[our + ".bias"] = w[0].transpose(3, 2, 0, 1), w[1]
        else:
            for s, v in zip((".gamma", ".beta", ".moving_mean", ".moving_variance"), w):
                out[our + s] = v
    return out


def keras_variable_to_name(model, names):
    """Maps each trainable variable (by id) to (our name, converter to our layout)."""
    from keras import layers
    mapping = {}
    for layer in model.layers:
        our = names.get(layer.name)
        if our is None:
            continue
        if isinstance(layer, layers.Conv2DTranspose):
            mapping[id(layer.kernel)] = (our + ".weight", lambda a: a.transpose(2, 3, 0, 1))
            mapping[id(layer.bias)] = (our + ".bias", lambda a: a)
        elif isinstance(layer, layers.Conv2D):
            mapping[id(layer.kernel)] = (our + ".weight", lambda a: a.transpose(3, 2, 0, 1))
            mapping[id(layer.bias)] = (our + ".bias", lambda a: a)
        else:
            mapping[id(layer.gamma)] = (our + ".gamma", lambda a: a)
            mapping[id(layer.beta)] = (our + ".beta", lambda a: a)
    return mapping


def bce_form_probe() -> str:
    """Which BCE Keras' train_on_batch computes for a sigmoid output (see the module docstring)."""
    import keras
    import tensorflow as tf
    from keras import layers

    x_in = keras.Input((2, 2, 1))
    out = layers.Conv2D(1, 1, activation="sigmoid", name="probe")(x_in)
    model = keras.Model(x_in, out)
    model.get_layer("probe").set_weights([np.zeros((1, 1, 1, 1), np.float32), np.array([-30.0], np.float32)])
    bce_fn = keras.losses.BinaryCrossentropy()

    def custom_loss(y_true, y_pred):
        return bce_fn(y_true, y_pred) + (tf.reduce_max(y_pred) - tf.reduce_max(y_true)) ** 2

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE), loss=custom_loss)
    x = np.ones((1, 2, 2, 1), np.float32)
    y = np.full((1, 2, 2, 1), 0.5, np.float32)
    result = model.train_on_batch(x, y)
    loss = float(result[0] if isinstance(result, (list, tuple)) else result)
    p = 1 / (1 + np.exp(30.0))
    logits_form = 0.5 * 30.0 + np.log1p(np.exp(-30.0)) + (p - 0.5) ** 2
    clipped_form = -(0.5 * np.log(1e-7) + 0.5 * np.log(1 - 1e-7)) + (p - 0.5) ** 2
    print(f"probe: Keras loss {loss:.6g}, logits form {logits_form:.6g}, clipped form {clipped_form:.6g}")
    if abs(loss - logits_form) < 1e-3 * logits_form:
        return "logits"
    if abs(loss - clipped_form) < 1e-3 * clipped_form:
        return "clipped"
    raise RuntimeError("the Keras BCE matches neither form")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "data" / "golden_train_step.npz"))
    ap.add_argument("--weights", default=str(REPO_ROOT / "weights" / "deepspot_hybrid.safetensors"))
    ap.add_argument("--compare", action="store_true", help="also run the C trainer and print the agreement")
    args = ap.parse_args(argv)

    import keras
    import tensorflow as tf

    params = {k: np.array(v) for k, v in load_safetensors_np(Path(args.weights)).items()}
    images_u8, targets_u8 = make_batch()
    x = scale(images_u8)[..., None]
    y = scale(targets_u8)[..., None]

    model, names = build_keras_model(SIZE)
    set_weights(model, names, params)
    before = get_weights(model, names)
    for k, v in before.items():
        assert np.array_equal(v, params[k]), k

    # The gradients alone, on a separate copy (a training-mode call also moves the BN statistics).
    grad_model, grad_names = build_keras_model(SIZE)
    set_weights(grad_model, grad_names, params)
    bce_fn = keras.losses.BinaryCrossentropy()

    def custom_loss(y_true, y_pred):  # deepspot/train.py
        bce = bce_fn(y_true, y_pred)
        max_pred = tf.reduce_max(y_true)
        max_true = tf.reduce_max(y_pred)
        return bce + (max_true - max_pred) ** 2

    logits_model = keras.Model(grad_model.input, grad_model.layers[-1].output)

    @tf.function
    def grads_and_logits(xb, yb):
        with tf.GradientTape() as tape:
            pred = grad_model(xb, training=True)
            loss = custom_loss(yb, pred)
        return loss, tape.gradient(loss, grad_model.trainable_variables)

    tape_loss, grads = grads_and_logits(tf.constant(x), tf.constant(y))
    mapping = keras_variable_to_name(grad_model, grad_names)
    grad_np = {}
    for var, g in zip(grad_model.trainable_variables, grads):
        name, conv = mapping[id(var)]
        grad_np[name] = conv(g.numpy())

    # Which BCE form did Keras use? Recompute both from the training-mode logits of a fresh copy.
    probe, probe_names = build_keras_model(SIZE)
    set_weights(probe, probe_names, params)
    head = probe.get_layer("head_conv")
    head_in = keras.Model(probe.input, head.input)
    features = head_in(x, training=True).numpy()
    w = params["head.conv.weight"][:, :, 0, 0].T  # [32, 1]
    z = (features @ w + params["head.conv.bias"]).astype(np.float64)[..., 0]
    t = y[..., 0].astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    max_term = (p.max() - t.max()) ** 2
    logits_form = float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))) + max_term)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    clipped_form = float(np.mean(-(t * np.log(pc) + (1 - t) * np.log(1 - pc))) + max_term)

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE, beta_1=0.9, beta_2=0.999,
                                                  epsilon=1e-7), loss=custom_loss)
    result = model.train_on_batch(x, y)
    loss = float(result[0] if isinstance(result, (list, tuple)) else result)
    after = get_weights(model, names)
    probe_form = bce_form_probe()
    bce_form = probe_form
    print(f"Keras loss {loss:.9g}; recomputed: logits form {logits_form:.9g}, clipped form {clipped_form:.9g}; "
          f"tape loss {float(tape_loss):.9g}; the probe says Keras uses the {probe_form} form")

    arrays: dict[str, np.ndarray] = {"images": images_u8, "targets": targets_u8, "loss": np.float64(loss),
                                     "loss_logits_form": np.float64(logits_form),
                                     "loss_clipped_form": np.float64(clipped_form)}
    for name in before:
        if ".moving_" in name:
            arrays[f"after/{name}"] = after[name].astype(np.float32)
        else:
            update = (after[name].astype(np.float64) - before[name]) / LEARNING_RATE
            assert np.max(np.abs(update)) <= 1.0 + 1e-3, name
            arrays[f"update/{name}"] = np.round(update * 127).astype(np.int8)
            if grad_np[name].ndim == 1 or name == "head.conv.weight":
                arrays[f"grad/{name}"] = grad_np[name].astype(np.float32)
    arrays["info"] = np.array(json.dumps({
        "tensorflow": tf.__version__, "keras": keras.__version__, "TF_ENABLE_ONEDNN_OPTS": "0",
        "bce_form_used_by_keras": bce_form, "learning_rate": LEARNING_RATE, "batch": [BATCH, SIZE, SIZE],
        "simulator": f"simulate_image(default_rng({SEED}), recipe='code', n_spots=12, size={SIZE}) x {BATCH}",
        "dropout": 0.0, "bn_momentum": 0.99, "bn_epsilon": 1e-3,
        "loss": "BinaryCrossentropy() + (max y_pred - max y_true)^2 over the batch (deepspot/train.py)",
        "update": "float16 (after - before) / learning_rate for trainable tensors; after/ = BN moving statistics",
    }))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    Path(args.out).write_bytes(buf.getvalue())
    print(f"wrote {args.out}: {len(buf.getvalue()) / 1e6:.2f} MB")

    if args.compare:
        compare(params, x[..., 0], y[..., 0], loss, before, after, grad_np, bce_form)
    return 0


def compare(params, x, y, loss, before, after, grad_tf, bce_form):
    from deepspot_napari import _core
    net = _core.Network(str(REPO_ROOT / "weights" / "deepspot_hybrid.safetensors"))
    tr = _core.Trainer(net, dropout=0.0, learning_rate=LEARNING_RATE, bce=bce_form)
    g_loss = tr.gradients(x, y)[0]
    worst_grad = []
    for name, g in grad_tf.items():
        ours = tr.get("grad." + name)
        worst_grad.append((float(np.max(np.abs(ours - g)) / max(np.max(np.abs(g)), 1e-30)), name))
    worst_grad.sort(reverse=True)
    print(f"gradients: loss ours {g_loss:.9g} vs Keras {loss:.9g}; worst per-tensor rel error (max|d|/max|g|):")
    for e, n in worst_grad[:8]:
        print(f"  {e:.2e} {n}")
    print("  median", np.median([e for e, _ in worst_grad]))
    step_loss = tr.step(x, y)[0]
    worst = []
    for name in before:
        ours = tr.get(name)
        worst.append((float(np.max(np.abs(ours - after[name])) / max(np.max(np.abs(after[name])), 1e-30)), name))
    worst.sort(reverse=True)
    print(f"step: loss ours {step_loss:.9g} vs Keras {loss:.9g} (rel {abs(step_loss - loss) / loss:.2e}); "
          "worst parameter rel errors after the update:")
    for e, n in worst[:8]:
        print(f"  {e:.2e} {n}")
    for name in before:
        if ".moving_" in name:
            continue
        u_ours = (tr.get(name).astype(np.float64) - before[name]) / LEARNING_RATE
        u_tf = (after[name].astype(np.float64) - before[name]) / LEARNING_RATE
        bad = np.mean(np.abs(u_ours - u_tf) > 0.02)
        if bad > 1e-3:
            print(f"  update differs by > 0.02 lr at {bad:.2%} of {name}")


if __name__ == "__main__":
    sys.exit(main())
