"""Training in the C core: the whole network's gradient against finite differences of the float64
reference, one training step against TensorFlow/Keras (golden values made by
tools/make_train_golden.py), overfitting, deterministic resume after an interruption, checkpoints,
Model.fit, and clear errors for bad input."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import reference as ref
from deepspot_napari import Cancelled, Model, _core, bundled_weights_path
from deepspot_napari.simulate import simulate_image
from deepspot_napari.train import (BEST_WEIGHTS, STATE_FILE, History, check_fit_options, fit, initial_parameters,
                                   make_training_pair, save_training_curves, stack_training_pairs)

GOLDEN = Path(__file__).parent / "data" / "golden_train_step.npz"
LR = 1e-4


@pytest.fixture(scope="module")
def network():  # the published weights: the Keras golden step and gradients are theirs
    return _core.Network(str(bundled_weights_path("hybrid")))


@pytest.fixture(scope="module")
def params():
    from safetensors.numpy import load_file  # test-only
    return load_file(str(bundled_weights_path("hybrid")))


def scale(a):
    a = np.asarray(a, np.float32)
    return a / a.reshape(len(a), -1).max(axis=1)[:, None, None]


def bn_fed_bias(name):
    """Convolution biases that a batch norm follows: the BN removes them, their true gradient is 0."""
    return name.endswith(".bias") and not re.fullmatch(r"trunk\.block\d\d\.conv3\.bias|head\.conv\.bias", name)


def simulated_batch(n, size, seed, n_spots=8):
    rng = np.random.default_rng(seed)
    images, points, xs, ts = [], [], [], []
    for _ in range(n):
        image, spots = simulate_image(rng, recipe="code", n_spots=n_spots, size=size)
        x, t = make_training_pair(image.astype(np.float32), spots)
        images.append(image)
        points.append(spots)
        xs.append(x)
        ts.append(t)
    return images, points, np.stack(xs), np.stack(ts)


# ---------------------------------------------------------------- gradients

GRADIENT_TENSORS = [
    "caso.strided.conv1.weight", "caso.maxpool.conv2.weight", "caso.atrous.bn3.gamma", "caso.maxpool.bn1.beta",
    "trunk.block01.shortcut.conv.weight", "trunk.block01.bn1.beta", "trunk.block04.conv1.weight",
    "trunk.block07.conv2.weight", "trunk.block13.bn3.gamma", "trunk.block13.conv3.bias",
    "decoder.up1.convt1.weight", "decoder.up2.shortcut.convt.weight", "decoder.up2.bn2.gamma",
    "decoder.up3.convt3.weight", "decoder.up3.shortcut.bn.beta", "head.conv.weight", "head.conv.bias",
]


def reference_loss(x, t, max_term, batch_norm, dropout_masks=None):
    """The float64 reference's training loss as a function of the parameters (batch statistics, or
    frozen batch norms: the inference network)."""
    x64 = x[..., None].astype(np.float64)
    if batch_norm == "batch":
        return lambda p: ref.deepspot_loss(ref.deepspot_logits_train(x64, p, dropout_masks=dropout_masks), t,
                                           "logits", max_term)
    return lambda p: ref.deepspot_loss(ref.deepspot_logits_inference(x64, p, dropout_masks=dropout_masks)[..., 0],
                                       t, "logits", max_term)


def worst_gradient_error(trainer, total, p64, rng) -> float:
    """The largest relative error over GRADIENT_TENSORS of the trainer's gradients against central
    differences of `total` (the float64 loss of the parameters): the derivative along a random
    direction and at each tensor's largest coordinate."""
    worst = 0.0
    for name in GRADIENT_TENSORS:
        g = trainer.get("grad." + name).astype(np.float64)
        base = p64[name]
        direction = rng.standard_normal(g.shape)
        h = 1e-7 * max(np.abs(base).max(), 1e-2) / np.abs(direction).max()
        fd_dir = (total({**p64, name: base + h * direction}) - total({**p64, name: base - h * direction})) / (2 * h)
        err_dir = abs(float(np.sum(g * direction)) - fd_dir) / (np.linalg.norm(g) * np.linalg.norm(direction))
        i = np.unravel_index(np.argmax(np.abs(g)), g.shape)
        e = np.zeros_like(base)
        e[i] = 1e-7 * max(abs(base[i]), 1e-2)
        fd_i = (total({**p64, name: base + e}) - total({**p64, name: base - e})) / (2 * e[i])
        err_i = abs(g[i] - fd_i) / abs(fd_i)
        print(f"{name}: directional {err_dir:.1e}, largest coordinate {err_i:.1e}")
        worst = max(worst, err_dir, err_i)
    print(f"worst relative error {worst:.2e}")
    return worst


@pytest.mark.parametrize("max_term,batch_norm", [("batch", "batch"), ("per_image", "batch"), ("batch", "frozen")])
def test_whole_network_gradient_matches_finite_differences(network, params, max_term, batch_norm):
    """Batch 2 at 32x32 (BN on batch statistics needs more than one value per channel: the trunk
    runs at 4x4), the published weights, dropout off. For each tensor: the derivative along a random
    direction and at its largest coordinate, against central differences of the float64 reference
    (in training mode, or with frozen batch norms the inference network)."""
    rng = np.random.default_rng(11)
    x = rng.random((2, 32, 32)).astype(np.float32)
    t = scale(rng.random((2, 32, 32)))
    trainer = _core.Trainer(network, dropout=0.0, max_term=max_term, batch_norm=batch_norm)
    loss = trainer.gradients(x, t)[0]
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    total = reference_loss(x, t, max_term, batch_norm)
    assert abs(loss - total(p64)) <= 1e-6 * loss
    assert worst_gradient_error(trainer, total, p64, rng) <= 1e-3
    if batch_norm == "frozen":
        return
    # a bias that a batch norm on batch statistics follows has no effect: its gradient is rounding noise
    assert np.abs(trainer.get("grad.caso.strided.conv2.bias")).max() <= 1e-5 * np.abs(
        trainer.get("grad.caso.strided.conv2.weight")).max()


DROPOUT_BLOCKS = {**{f"trunk.block{b:02d}": f"trunk.block{b:02d}.conv3.bias" for b in range(1, 14)},
                  **{f"decoder.up{j}": f"decoder.up{j}.bn3.beta" for j in (1, 2, 3)}}


@pytest.mark.parametrize("batch_norm", ["batch", "frozen"])
def test_whole_network_gradient_with_dropout_matches_finite_differences(network, params, batch_norm):
    """Training as fit does it, with spatial dropout (rate 0.2). One image, so that a dropped channel
    shows as an exactly zero gradient of the last tensor of its block's main path (a trunk block's
    conv3 bias, a decoder block's bn3 beta): the masks read from there go into the float64
    reference, which must then give the trainer's loss (so they are the masks the forward used) and
    its gradients, as without dropout. That reading needs a gradient at every channel of each
    decoder block's output (a channel its ReLU kills everywhere has none, dropped or not): the
    shortcut's gradient shows it, and this input has none dead (others do, with frozen batch norms)."""
    rate = 0.2
    rng = np.random.default_rng(19)
    x = rng.random((1, 32, 32)).astype(np.float32)
    t = scale(rng.random((1, 32, 32)))
    trainer = _core.Trainer(network, dropout=rate, max_term="batch", batch_norm=batch_norm, seed=3)
    loss = trainer.gradients(x, t)[0]
    for j in (1, 2, 3):
        assert np.all(trainer.get(f"grad.decoder.up{j}.shortcut.bn.beta") != 0), f"a dead channel in decoder.up{j}"
    masks = {block: np.where(trainer.get("grad." + tensor) != 0, 1 / (1 - rate), 0.0)[None, :]
             for block, tensor in DROPOUT_BLOCKS.items()}
    dropped = np.mean(np.concatenate([mask[0] == 0 for mask in masks.values()]))
    assert 0.1 < dropped < 0.3, f"{dropped:.0%} of the channels dropped, with rate {rate}"
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    total = reference_loss(x, t, "batch", batch_norm, masks)
    assert abs(loss - total(p64)) <= 1e-5 * loss  # float32 rounding (batch statistics of one image)
    assert abs(loss - reference_loss(x, t, "batch", batch_norm)(p64)) > 1e-2 * loss  # dropout mattered
    assert worst_gradient_error(trainer, total, p64, rng) <= 1e-3


# ---------------------------------------------------------------- one step against Keras

@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def test_golden_file_is_small_and_recorded_with_keras_logits_bce(golden):
    assert GOLDEN.stat().st_size < 4e6
    info = json.loads(str(golden["info"]))
    assert info["bce_form_used_by_keras"] == "logits"
    assert info["learning_rate"] == LR


def test_one_training_step_matches_keras(network, params, golden):
    x, t = scale(golden["images"]), scale(golden["targets"])
    trainer = _core.Trainer(network, dropout=0.0, learning_rate=LR)
    loss = trainer.step(x, t)[0]
    expected_loss = float(golden["loss"])
    print(f"loss: ours {loss:.9g}, Keras {expected_loss:.9g}, rel {abs(loss - expected_loss) / expected_loss:.1e}")
    assert abs(loss - expected_loss) <= 1e-4 * expected_loss

    worst, diffs, outside, total = 0.0, [], [], []
    for key in golden.files:
        if key.startswith("after/"):  # BN moving statistics
            name = key[6:]
            expected = golden[key]
            err = np.max(np.abs(trainer.get(name) - expected)) / np.max(np.abs(expected))
            assert err <= 1e-4, name
            worst = max(worst, err)
        elif key.startswith("update/"):
            name = key[7:]
            before = params[name].astype(np.float64)
            expected = before + LR * golden[key].astype(np.float64) / 127  # int8 update: +-4e-7
            got = trainer.get(name).astype(np.float64)
            if bn_fed_bias(name):
                # A batch norm follows: the true gradient is exactly 0 and both implementations
                # step on float32 rounding noise (|g| ~ 1e-6, comparable to Adam's eps / sqrt(1 -
                # beta2) = 3e-6), so only the bound of one Adam step (lr) is common to both.
                assert np.max(np.abs(got - before)) <= LR * 1.001, name
                continue
            err = np.abs(got - expected) / np.max(np.abs(expected))
            # Where |g| is near Adam's eps / sqrt(1 - beta2) = 3e-6 the first step is most sensitive
            # to the gradient, and there float32 noise (ours and TF's: both differ from the float64
            # finite differences by ~1e-6 absolute) moves single values by up to ~0.5 lr.
            outside.append(np.count_nonzero(err > 1e-4))
            total.append(err.size)
            assert np.max(np.abs(got - expected)) <= 2 * LR, name  # a sign flip at |g| ~ 0 at most
            worst = max(worst, float(np.median(err)))
            diffs.append(np.abs((got - before) / LR - golden[key] / 127.0).ravel())
    diffs = np.concatenate(diffs)
    assert sum(outside) <= 2e-3 * sum(total)
    print(f"parameters after the step: {sum(outside)} of {sum(total)} values differ from Keras' by more than 1e-4 "
          f"of their tensor's largest value; worst per-tensor median {worst:.1e}; update / lr differs by "
          f"median {np.median(diffs):.4f}, 99th percentile {np.percentile(diffs, 99):.4f}, "
          f"> 0.05 for {np.mean(diffs > 0.05):.3%} of the values")
    assert np.median(diffs) <= 0.005 and np.percentile(diffs, 99) <= 0.02 and np.mean(diffs > 0.05) <= 0.005


def test_gradients_match_keras(network, golden):
    x, t = scale(golden["images"]), scale(golden["targets"])
    trainer = _core.Trainer(network, dropout=0.0)
    trainer.gradients(x, t)
    errors = {}
    for key in golden.files:
        if key.startswith("grad/") and not bn_fed_bias(key[5:]):
            expected = golden[key]
            errors[key[5:]] = np.max(np.abs(trainer.get("grad." + key[5:]) - expected)) / np.max(np.abs(expected))
    print(f"{len(errors)} tensors: median {np.median(list(errors.values())):.1e}, worst {max(errors.values()):.1e}")
    assert np.median(list(errors.values())) <= 1e-3 and max(errors.values()) <= 3e-2


# ---------------------------------------------------------------- the trainer

def test_evaluate_is_the_inference_network(network):
    rng = np.random.default_rng(5)
    x = rng.random((2, 48, 40)).astype(np.float32)
    trainer = _core.Trainer(network)
    pred, loss = trainer.evaluate(x)
    assert loss is None
    assert np.max(np.abs(pred - network.forward(x[..., None])[..., 0])) <= 1e-5
    pred2, (value, bce, max_term) = trainer.evaluate(x, scale(x))
    assert np.array_equal(pred, pred2) and value == pytest.approx(bce + max_term)


def test_steps_are_reproducible_and_dropout_is_seeded(network):
    _, _, x, t = simulated_batch(2, 32, seed=1)
    runs = []
    for seed in (7, 7, 8):
        trainer = _core.Trainer(network, seed=seed, learning_rate=1e-3)
        losses = [trainer.step(x, t)[0] for _ in range(2)]
        runs.append((losses, trainer.get("trunk.block05.conv2.weight"), trainer.get("decoder.up3.bn1.moving_mean")))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1]) and np.array_equal(runs[0][2], runs[1][2])
    assert runs[0][0][0] != runs[2][0][0]  # another dropout mask
    trainer = _core.Trainer(network)
    assert trainer.step_count == 0
    trainer.step(x, t)
    assert trainer.step_count == 1


def test_gil_is_released_and_calls_do_not_overlap(network):
    """While one thread's step runs (GIL released: this thread keeps counting), every other call on
    the same trainer is refused with "busy" instead of running concurrently on its buffers; once
    the step is over they work again."""
    import threading
    _, _, x, t = simulated_batch(8, 128, seed=6)  # a step of a few hundred milliseconds
    trainer = _core.Trainer(network)
    trainer.step(x, t)  # build the graph first
    ticks, outcomes, started, done = [0], [], threading.Event(), threading.Event()

    def train():
        started.set()
        trainer.step(x, t)
        done.set()

    worker = threading.Thread(target=train)
    worker.start()
    started.wait()
    while not done.is_set():
        ticks[0] += 1
        if ticks[0] % 1000 == 0:
            try:
                trainer.get("head.conv.bias")
                outcomes.append("ran")
            except RuntimeError as e:
                outcomes.append(str(e))
    worker.join()
    assert ticks[0] > 1000
    assert any("busy in another thread" in outcome for outcome in outcomes), outcomes[:5]
    assert set(outcomes) <= {"ran", "the trainer is busy in another thread"}
    assert trainer.get("head.conv.bias").shape == (1,) and trainer.step_count == 2


def test_moving_statistics_follow_keras_momentum(network):
    _, _, x, t = simulated_batch(2, 32, seed=2)
    trainer = _core.Trainer(network, dropout=0.0)
    name = "decoder.up3.shortcut.bn"
    mean0, var0 = trainer.get(name + ".moving_mean"), trainer.get(name + ".moving_variance")
    trainer.step(x, t)
    mean1, var1 = trainer.get(name + ".moving_mean"), trainer.get(name + ".moving_variance")
    # batch statistics recovered from the update: moving = 0.99 moving + 0.01 batch
    batch_var = (var1 - 0.99 * var0) / 0.01
    assert np.all(batch_var > -1e-3 * np.abs(var0).max()) and not np.allclose(mean1, mean0)
    # bn_bessel: the unbiased batch variance (TF 2.x fused batch norm), n = 2 x 32 x 32 here
    bessel = _core.Trainer(network, dropout=0.0, bn_bessel=True)
    bessel.step(x, t)
    assert np.array_equal(bessel.get(name + ".moving_mean"), mean1)
    ratio = (bessel.get(name + ".moving_variance") - 0.99 * var0) / (var1 - 0.99 * var0)
    assert np.allclose(ratio, 2048 / 2047, rtol=1e-4)


def test_frozen_batch_norm_trains_the_inference_network_and_keeps_its_statistics(network):
    """batch_norm='frozen': the training forward (dropout off) is the inference forward, a step
    changes the weights but no moving statistic, and the setting is fixed for the trainer's life."""
    rng = np.random.default_rng(5)
    x = rng.random((2, 32, 32)).astype(np.float32)
    t = scale(rng.random((2, 32, 32)))
    trainer = _core.Trainer(network, dropout=0.0, batch_norm="frozen", learning_rate=1e-5)
    assert trainer.config["batch_norm"] == "frozen"
    moving = {n: trainer.get(n) for n in trainer.names if ".moving_" in n}
    inference_loss = trainer.evaluate(x, t)[1][0]
    step_loss = trainer.step(x, t)[0]
    assert abs(step_loss - inference_loss) <= 1e-5 * inference_loss
    assert all(np.array_equal(trainer.get(n), v) for n, v in moving.items())
    assert not np.array_equal(trainer.get("head.conv.weight"), network_parameter(network, "head.conv.weight"))
    assert trainer.evaluate(x, t)[1][0] < inference_loss  # the step lowered the loss inference sees
    batch = _core.Trainer(network, dropout=0.0)
    batch.step(x, t)
    assert not np.array_equal(batch.get("caso.strided.bn1.moving_mean"), moving["caso.strided.bn1.moving_mean"])
    with pytest.raises(ValueError, match="batch_norm must be one of 'batch', 'frozen'"):
        _core.Trainer(network, batch_norm="fixed")


def network_parameter(network, name):
    return _core.Trainer(network).get(name)


def test_parameters_round_trip_through_a_checkpoint(network, tmp_path):
    _, _, x, t = simulated_batch(2, 32, seed=3)
    trainer = _core.Trainer(network, learning_rate=1e-3)
    trainer.step(x, t)
    from deepspot_napari.safetensors_io import save_safetensors
    tensors = {n: trainer.get(n) for n in trainer.names}
    tensors.update({f"adam.{k}.{n}": trainer.get(f"adam.{k}.{n}") for n in trainer.names for k in "mv"
                    if ".moving_" not in n})
    save_safetensors(tmp_path / "c.safetensors", tensors)
    other = _core.Trainer(network, learning_rate=1e-3)
    other.load(str(tmp_path / "c.safetensors"))
    other.step_count = trainer.step_count
    assert trainer.step(x, t) == other.step(x, t)
    assert np.array_equal(trainer.get("head.conv.weight"), other.get("head.conv.weight"))
    # loading is all or nothing
    del tensors["head.conv.bias"]
    save_safetensors(tmp_path / "bad.safetensors", tensors)
    before = other.get("caso.strided.conv1.weight")
    with pytest.raises(ValueError, match="lacks parameter 'head.conv.bias'"):
        other.load(str(tmp_path / "bad.safetensors"))
    assert np.array_equal(other.get("caso.strided.conv1.weight"), before)
    with pytest.raises(KeyError):
        other.get("no.such.tensor")
    with pytest.raises(ValueError, match="shape"):
        other.set("head.conv.bias", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="finite"):
        other.set("head.conv.bias", np.array([np.nan], np.float32))


def test_trainer_rejects_bad_batches(network):
    trainer = _core.Trainer(network)
    good = np.ones((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="multiples of 8"):
        trainer.step(np.ones((1, 12, 16), np.float32), np.ones((1, 12, 16), np.float32))
    with pytest.raises(ValueError, match="shape of images"):
        trainer.step(good, np.ones((1, 16, 8), np.float32))
    with pytest.raises(TypeError, match="float32"):
        trainer.step(good.astype(np.float64), good)
    with pytest.raises(ValueError, match="NaN or Inf"):
        trainer.step(np.full((1, 16, 16), np.nan, np.float32), good)
    with pytest.raises(ValueError, match="NaN or Inf"):
        trainer.evaluate(good, np.full((1, 16, 16), np.inf, np.float32))
    assert trainer.step_count == 0
    with pytest.raises(ValueError, match="max_term"):
        _core.Trainer(network, max_term="mean")


# ---------------------------------------------------------------- learning

def test_overfits_four_simulated_images(network):
    """From Keras' default initialisation, lr 1e-3, dropout off: the loss above its floor (the
    targets' own entropy, which the BCE against soft targets can never go below) falls more than
    10x within 60 steps on 4 simulated 64x64 images."""
    _, _, x, t = simulated_batch(4, 64, seed=3)
    tc = np.clip(t.astype(np.float64), 1e-12, 1 - 1e-12)
    floor = float(np.mean(-(tc * np.log(tc) + (1 - tc) * np.log(1 - tc))))
    trainer = _core.Trainer(network, dropout=0.0, learning_rate=1e-3)
    for name, value in initial_parameters(trainer, seed=0).items():
        trainer.set(name, value)
    excess = []
    for _ in range(60):
        excess.append(trainer.step(x, t)[0] - floor)
        if excess[-1] < excess[0] / 10:
            break
    print(f"excess loss {excess[0]:.4f} -> {excess[-1]:.4f} in {len(excess)} steps")
    assert excess[-1] < excess[0] / 10


def test_initial_parameters_follow_keras_defaults(network):
    trainer = _core.Trainer(network)
    p = initial_parameters(trainer, seed=1)
    w = p["caso.maxpool.conv2.weight"]  # glorot uniform, fans 9*32 and 9*64
    assert np.abs(w).max() <= np.sqrt(6 / (9 * 32 + 9 * 64)) and w.std() > 0.5 * np.sqrt(2 / (9 * 32 + 9 * 64))
    he = p["decoder.up1.convt1.weight"]  # he normal on Keras' fan_in of (3, 3, 256, 128): 9 * 256
    assert abs(he.std() - np.sqrt(2 / (9 * 256))) < 0.1 * np.sqrt(2 / (9 * 256))
    assert np.all(p["trunk.block01.bn1.gamma"] == 1) and np.all(p["trunk.block01.bn1.moving_variance"] == 1)
    assert np.all(p["head.conv.bias"] == 0)
    assert np.array_equal(p["head.conv.weight"], initial_parameters(trainer, seed=1)["head.conv.weight"])


# ---------------------------------------------------------------- fit

def small_dataset(n=6, size=32, seed=4):
    images, points, _, _ = simulated_batch(n, size, seed, n_spots=5)
    return images, points


FIT = dict(epochs=3, batch_size=2, patch_size=32, validation_split=0.34, seed=3, learning_rate=1e-3, steps_per_epoch=2)


def test_fit_resumes_after_an_interruption_with_identical_weights(tmp_path):
    images, points = small_dataset()
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    history, trainer = fit(Model.load(), images, points, checkpoint_dir=full_dir, return_trainer=True, **FIT)
    assert history.epoch == [1, 2, 3] and len(history.val_f1) == 3
    steps = []

    def cancel():
        steps.append(1)
        return len(steps) == 3  # mid epoch 2 (two steps per epoch)

    with pytest.raises(Cancelled):
        fit(Model.load(), images, points, checkpoint_dir=cut_dir, cancel=cancel, **FIT)
    state = json.loads((cut_dir / STATE_FILE).read_text())
    assert state["epoch"] == 1 and state["step_count"] == 2
    resumed, resumed_trainer = fit(Model.load(), images, points, checkpoint_dir=cut_dir, return_trainer=True, **FIT)
    assert resumed.epoch == [1, 2, 3]
    assert resumed.loss == history.loss and resumed.val_loss == history.val_loss
    for name in trainer.names:
        assert np.array_equal(trainer.get(name), resumed_trainer.get(name)), name
    assert (full_dir / BEST_WEIGHTS).is_file() and (full_dir / "curves.png").is_file()
    assert len(list(full_dir.glob("checkpoint-*.safetensors"))) == 1
    # the best weights load as a model, and so does a per-epoch checkpoint (its Adam moments ignored)
    Model.load(full_dir / BEST_WEIGHTS)
    checkpoint = full_dir / json.loads((full_dir / STATE_FILE).read_text())["checkpoint"]
    x = images[0].astype(np.float32)
    trainer.load(str(checkpoint))
    np.testing.assert_allclose(Model.load(checkpoint, device="cpu").enhance(x),
                               Model(trainer.to_network(), checkpoint, "cpu").enhance(x), atol=1e-6)
    # another data set or setting cannot resume this run
    with pytest.raises(ValueError, match="cannot resume"):
        fit(Model.load(), images[:5], points[:5], checkpoint_dir=full_dir, **FIT)


def test_fit_keeps_the_best_weights_and_stops_early(tmp_path):
    """A learning rate far too high makes the validation loss worsen: training stops after
    `patience` epochs without improvement and ends with the best epoch's weights. (On batch
    statistics, which keep the activations bounded; frozen batch norms let such a rate diverge.)"""
    images, points = small_dataset()
    history, trainer = fit(Model.load(), images, points, return_trainer=True, patience=1, checkpoint_dir=tmp_path,
                           monitor="loss", batch_norm="batch", **{**FIT, "epochs": 6, "learning_rate": 0.05})
    best = history.best_epoch
    assert history.val_loss[best - 1] == min(history.val_loss)
    if history.stopped_early:
        assert len(history.epoch) == best + 1
    else:
        assert len(history.epoch) == 6
    x = np.stack([make_training_pair(i.astype(np.float32), p)[0] for i, p in zip(images, points)])
    best_network = _core.Network(str(tmp_path / BEST_WEIGHTS))
    assert np.max(np.abs(trainer.evaluate(x)[0] - best_network.forward(x[..., None])[..., 0])) < 1e-5


def test_a_diverging_run_says_so_instead_of_saving_infinities(tmp_path):
    images, points = small_dataset()
    with pytest.raises(ValueError, match="diverged in epoch 1.*learning rate 0.05 is too high"):
        fit(Model.load("hybrid"), images, points, checkpoint_dir=tmp_path, **{**FIT, "learning_rate": 0.05})


def test_model_fit_updates_the_model_in_place(tmp_path):
    images, points = small_dataset(n=3)
    model = Model.load()
    before = model.enhance(images[0].astype(np.float32), tile_size=None)
    seen = []
    history = model.fit(images, points, progress=lambda d, t: seen.append((d, t)),
                        checkpoint_dir=tmp_path, **{**FIT, "epochs": 1, "validation_split": 0.0})
    assert isinstance(history, History) and len(history.loss) == 1 and np.isnan(history.val_loss[0])
    after = model.enhance(images[0].astype(np.float32), tile_size=None)
    assert np.max(np.abs(after - before)) > 1e-4
    assert model.path == tmp_path / BEST_WEIGHTS
    assert np.max(np.abs(after - Model.load(model.path).enhance(images[0].astype(np.float32), tile_size=None))) < 1e-5
    assert seen[-1][0] == seen[-1][1] == 2


def test_fit_adds_simulated_images_each_epoch():
    from deepspot_napari.train import MIN_EPOCH_STEPS
    images, points = small_dataset(n=2)
    history = fit(Model.load(), images, points, simulate=3, **{**FIT, "epochs": 1, "validation_split": 0.0,
                                                       "steps_per_epoch": None})
    assert history.steps == MIN_EPOCH_STEPS  # (2 + 3 simulated) / 2 steps cover them, raised to the minimum
    history = fit(Model.load(), images * 20, points * 20, simulate=3, **{**FIT, "epochs": 1, "validation_split": 0.0,
                                                                 "steps_per_epoch": None})
    assert history.steps == -(-(40 + 3) // 2)  # enough crops to cover the 40 tiles and the simulated ones once


def test_compressed_target_keeps_the_background_below_its_level_also_without_spots(rng):
    image = rng.uniform(100, 200, (32, 32)).astype(np.float32)
    points = np.array([[10.0, 12.0], [20.2, 5.7]])
    x, paper = make_training_pair(image, points)
    _, compressed = make_training_pair(image, points, 0.5)
    assert np.array_equal(paper[10, 12], compressed[10, 12]) and compressed[10, 12] == 1.0  # stamps alike
    far = np.ones(image.shape, bool)
    far[8:13, 10:15] = far[18:23, 4:9] = False
    assert np.allclose(compressed[far], 0.5 * x[far])  # the background at half the input
    _, empty_paper = make_training_pair(image, np.zeros((0, 2)))
    _, empty = make_training_pair(image, np.zeros((0, 2)), 0.5)
    assert empty_paper.max() == 1.0 and empty.max() == pytest.approx(0.5)  # nothing to detect stays below 0.5


def test_fit_records_the_target_and_validates_on_given_images(tmp_path):
    images, points = small_dataset(n=3)
    history = fit(Model.load(), images[:2], points[:2], validation=(images[2:], points[2:]), target_background=0.5,
                  checkpoint_dir=tmp_path, **{**FIT, "epochs": 1})
    assert np.isfinite(history.val_loss[0])
    model = Model.load(tmp_path / BEST_WEIGHTS)
    assert model.target_background == 0.5 and Model.load("hybrid").target_background is None
    # fine-tuning a model keeps its target ("model", the default) and its detection defaults
    from deepspot_napari.train import _save_weights
    _save_weights(model.make_trainer(), tmp_path / "base.safetensors", False,
                  {"target_background": 0.5, "detection": '{"threshold": 0.6}'})
    fit(Model.load(tmp_path / "base.safetensors"), images[:2], points[:2], checkpoint_dir=tmp_path / "again",
        **{**FIT, "epochs": 1, "validation_split": 0.0})
    tuned = Model.load(tmp_path / "again" / BEST_WEIGHTS)
    assert tuned.target_background == 0.5 and tuned.detection.threshold == 0.6


def test_crops_stay_in_their_area_and_carry_their_points_through_rotations(rng):
    from deepspot_napari.train import _Area, _crops
    image = rng.uniform(1, 10, (40, 56)).astype(np.float32)
    truth = np.c_[rng.uniform(2, 38, 30), rng.uniform(2, 54, 30)]
    for y, x in np.rint(truth).astype(int):
        image[y, x] = 1000.0  # each annotated pixel the brightest around
    area = _Area(image, truth, 0, (0, 0))
    data = _crops([area], 40, 32, rng, augment=True, target_background=None)
    assert data.x.shape == (40, 32, 32) and np.allclose(data.x.reshape(40, -1).max(axis=1), 1)
    for x, t, pts in zip(data.x, data.t, data.points):
        r = np.rint(pts).astype(int)
        assert np.all((r >= 0) & (r < 32))
        assert np.all(t[r[:, 0], r[:, 1]] == 1.0)  # the stamp's centre sits on the turned point
        assert np.all(x[r[:, 0], r[:, 1]] > 0.5)   # ... which is the turned bright pixel
    plain = _crops([area], 5, 32, np.random.default_rng(1), augment=False, target_background=None)
    for x in plain.x:  # without augmentation, a crop is a window of the image, scaled
        found = [(y0, x0) for y0 in range(9) for x0 in range(25)
                 if np.allclose(image[y0:y0 + 32, x0:x0 + 32] / image[y0:y0 + 32, x0:x0 + 32].max(), x)]
        assert found


def test_regions_limit_training_to_the_annotated_rectangles(rng):
    """Only the rectangles count: spots drawn outside them (unannotated) change nothing."""
    images, points = small_dataset(n=1, size=96)
    image, pts = images[0].astype(np.float32), points[0]
    region = (8, 16, 72, 88)
    inside = (pts[:, 0] >= 8) & (pts[:, 0] < 72) & (pts[:, 1] >= 16) & (pts[:, 1] < 88)
    altered = image.copy()
    altered[80:90, 0:10] += 500.0  # a bright unannotated blob outside the region
    altered[0:6, 90:96] += 300.0
    settings = {**FIT, "epochs": 1, "validation_split": 0.0, "dropout": 0.0}
    runs = [fit(Model.load(), [im], [pts if k == 0 else pts[inside]], regions=[region], return_trainer=True,
                check_annotations=False, **settings) for k, im in enumerate((image, altered))]
    assert runs[0][0].loss == runs[1][0].loss
    assert np.array_equal(runs[0][1].get("head.conv.weight"), runs[1][1].get("head.conv.weight"))
    whole = fit(Model.load(), [altered], [pts], return_trainer=True, check_annotations=False, **settings)
    assert whole[0].loss != runs[1][0].loss  # without the region, the blobs are trained on
    with pytest.raises(ValueError, match="not inside the 96x96 image"):
        fit(Model.load(), [image], [pts], regions=[(0, 0, 100, 50)], **settings)
    with pytest.raises(ValueError, match="too small"):
        fit(Model.load(), [image], [pts], regions=[(0, 0, 20, 50)], **settings)


@pytest.mark.parametrize("images,points,error,message", [
    ([np.ones((32, 32))], [np.array([[40.0, 3.0]])], ValueError, "outside"),
    ([np.ones((32, 32))], [np.array([[-1.0, 3.0]])], ValueError, "outside"),
    ([np.ones((32, 32)), np.ones((32, 32))], [np.zeros((0, 2))], ValueError, "2 images but 1 point lists"),
    ([np.full((32, 32), np.nan)], [np.zeros((0, 2))], ValueError, "NaN"),
    ([np.zeros((32, 32))], [np.zeros((0, 2))], ValueError, "maximum"),
    ([np.ones((32, 32, 3))], [np.zeros((0, 2))], ValueError, "2D"),
    ([np.ones((32, 32))], [np.array([[1.0, np.inf]])], ValueError, "NaN or Inf"),
    ([np.ones((32, 32))], [np.ones((3, 3))], ValueError, r"\(n, 2\)"),
    ([], [], ValueError, "no training images"),
])
def test_fit_rejects_bad_inputs(images, points, error, message):
    with pytest.raises(error, match=message):
        fit(Model.load(), images, points, epochs=1, patch_size=32)


def test_fit_rejects_bad_settings():
    images, points = small_dataset(n=2)
    for kwargs, message in [(dict(epochs=0), "epochs"), (dict(epochs=1, batch_size=0), "batch_size"),
                            (dict(epochs=1, max_term="mean"), "max_term"),
                            (dict(epochs=1, validation_split=1.0), "validation_split"),
                            (dict(epochs=1, patch_size=30), "patch_size"), (dict(epochs=1, dropout=1.0), "dropout"),
                            (dict(epochs=1, target_background=0.0), "target_background"),
                            (dict(epochs=1, target_background="zero"), "target_background"),
                            (dict(epochs=1, validation=([np.ones((32, 32))],)), "validation must be")]:
        with pytest.raises(ValueError, match=message):
            fit(Model.load(), images, points, **kwargs)
    # the same rules, for callers that check before starting a run (the Train widget)
    check_fit_options(learning_rate=3.0)  # large, but a learning rate
    for kwargs, message in [(dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate="1e-4"), "learning_rate"),
                            (dict(learning_rate=float("nan")), "learning_rate"), (dict(batch_size=0), "batch_size"),
                            (dict(validation_split=-0.1), "validation_split")]:
        with pytest.raises(ValueError, match=message):
            check_fit_options(**kwargs)
    with pytest.raises(TypeError, match="fit trains a Model"):
        fit("weights.safetensors", images, points)


def test_an_annotated_stack_gives_one_training_pair_per_annotated_plane(rng):
    stack = rng.random((2, 3, 40, 50)).astype(np.float32)
    points = np.array([[0, 1, 5.0, 6.0], [1.2, 2.4, 7.0, 8.0], [0, 0.6, 9.5, 10.0], [1, 2, 30.0, 40.0]])
    images, plane_points = stack_training_pairs(stack, points)
    assert len(images) == 2  # planes (0, 1) and (1, 2); the four unannotated planes are left out
    assert np.array_equal(images[0], stack[0, 1]) and np.array_equal(images[1], stack[1, 2])
    assert np.array_equal(plane_points[0], [[5, 6], [9.5, 10]])
    assert np.array_equal(plane_points[1], [[7, 8], [30, 40]])
    image, pts = stack_training_pairs(stack[0, 0], points[:, 2:])  # 2D: the image and all its points
    assert np.array_equal(image[0], stack[0, 0]) and np.array_equal(pts[0], points[:, 2:])
    assert stack_training_pairs(stack, np.zeros((0, 4))) == ([], [])
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        stack_training_pairs(stack, points[:, 1:])


def test_training_curves_png(tmp_path):
    h = History(epoch=[1, 2, 3], loss=[1.0, 0.5, 0.3], val_loss=[1.1, 0.6, 0.5], val_f1=[0.2, 0.5, 0.7])
    save_training_curves(h, tmp_path / "c.png")
    from PIL import Image
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (800, 500) and len(set(im.getdata())) > 3


def test_training_curves_legend_lies_outside_the_plot_area(tmp_path):
    """Without epochs nothing is drawn inside the plot's frame: the legend is below it, where it hides no curve."""
    save_training_curves(History(), tmp_path / "empty.png")
    from PIL import Image
    with Image.open(tmp_path / "empty.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    frame = np.flatnonzero((pixels[:, 200] == 0).all(axis=1))  # the frame's top and bottom edges
    top, bottom = frame[0], frame[-1]
    assert bottom - top > 300 and (pixels[top + 2:bottom - 1, 75:735] == 255).all()
    below = pixels[bottom + 1:]
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # train loss, val loss, val F1
        assert (below == colour).all(axis=-1).any(), colour


def _areas(shapes, points_per_area=0, rng=None):
    from deepspot_napari.train import _Area
    out = []
    for k, shape in enumerate(shapes):
        pts = np.c_[rng.uniform(0, shape[0] - 1, points_per_area), rng.uniform(0, shape[1] - 1, points_per_area)] \
            if points_per_area else np.zeros((0, 2))
        out.append(_Area(np.ones(shape, np.float32), pts, k, (0, 0)))
    return out


@pytest.mark.parametrize("count, fraction", [(5, 0.2), (7, 0.34), (12, 0.5)])
def test_validation_holds_out_whole_areas_from_five_on(count, fraction, rng):
    from deepspot_napari.train import _split_validation
    areas = _areas([(32 * int(rng.integers(1, 4)), 32) for _ in range(count)], rng=rng)
    seed = int(rng.integers(1 << 30))
    train, val = _split_validation(areas, fraction, seed)
    assert train and val and len(train) + len(val) == count
    assert not {a.source for a in train} & {a.source for a in val}
    again = _split_validation(areas, fraction, seed)
    assert [a.source for a in again[1]] == [a.source for a in val]  # seeded
    assert _split_validation(areas, 0.0, seed) == (areas, [])


def test_validation_of_one_image_is_a_strip_holding_its_share_of_the_spots(rng):
    from deepspot_napari.train import _Area, _split_validation
    # spots only in the left 60 columns: the right strip holds none, the left one two thirds,
    # the top and bottom ones about a fifth each: one of those validates
    pts = np.c_[rng.uniform(0, 199, 50), rng.uniform(0, 59, 50)]
    image = np.ones((200, 200), np.float32)
    (t,), (v,) = _split_validation([_Area(image, pts, 0, (0, 0))], 0.2, int(rng.integers(1 << 30)))
    assert t.image.size + v.image.size == image.size and v.image.size == 0.2 * image.size
    assert v.image.shape == (40, 200) and v.origin in ((0, 0), (160, 0))
    assert len(t.points) + len(v.points) == 50 and 0 < len(v.points) < 50
    assert abs(len(v.points) / 50 - 0.2) <= 0.15
    # a 100 px high image has no room for a top or bottom strip: the left one (with spots) is
    # taken over the right one, closer to a fifth of the spots but empty
    flat = pts[pts[:, 0] < 99]
    (t,), (v,) = _split_validation([_Area(image[:100], flat, 0, (0, 0))], 0.2, int(rng.integers(1 << 30)))
    assert v.image.shape == (100, 40) and v.origin == (0, 0) and len(v.points) > 0
    with pytest.raises(ValueError, match="validation strip"):
        _split_validation([_Area(np.ones((40, 40), np.float32), pts[:0], 0, (0, 0))], 0.2, 0)


def test_fit_bn_bessel_takes_the_unbiased_batch_variance():
    images, points = small_dataset(n=2)
    settings = {**FIT, "epochs": 1, "validation_split": 0.0, "dropout": 0.0}
    name = "trunk.block02.bn1.moving_variance"
    moving = {}
    for bessel in (False, True):
        _, trainer = fit(Model.load(), images, points, bn_bessel=bessel, batch_norm="batch", return_trainer=True, **settings)
        moving[bessel] = trainer.get(name).astype(np.float64)
    # the same first batch: moving = 0.99 m + 0.01 v (n / (n - 1) with Bessel), so only the batch term grows
    assert np.all(moving[True] >= moving[False]) and np.any(moving[True] > moving[False])
    with pytest.raises(ValueError, match="bn_bessel .* needs batch_norm='batch'"):
        fit(Model.load(), images, points, bn_bessel=True, batch_norm="frozen", **settings)


def test_fine_tuning_on_a_real_crop_lowers_the_loss_on_held_out_annotated_pixels():
    """A short fine-tune with the defaults on a 256 px crop of the real annotated image lowers the
    loss on another crop of it that training never saw."""
    from realdata import annotated_real_image
    image, truth = annotated_real_image()

    def crop(y0, x0, side=256):
        keep = np.all((np.rint(truth) >= [y0, x0]) & (np.rint(truth) < [y0 + side, x0 + side]), axis=1)
        return image[y0:y0 + side, x0:x0 + side], truth[keep] - [y0, x0]

    (train_image, train_points), (held_image, held_points) = crop(97, 40), crop(97, 420)
    x, t = make_training_pair(held_image, held_points)

    def held_out_loss(trainer):
        return float(trainer.evaluate(x[None], t[None])[1][0])

    before = held_out_loss(Model.load(device="cpu").make_trainer())
    history, trainer = fit(Model.load(device="cpu"), [train_image], [train_points], epochs=4, seed=1,
                           validation_split=0.0, return_trainer=True)
    after = held_out_loss(trainer)
    assert np.isfinite(after) and after < before - 0.005, (before, after, history.loss)
