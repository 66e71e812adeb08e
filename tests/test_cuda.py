"""The GPU backend (deepspot_napari._core_cuda, cuDNN) against the CPU backend (deepspot_napari._core,
oneDNN): every single op forward and backward, the whole network (and the original TensorFlow
model's golden outputs), one training step, a 200-step training run, and TF32 math.

Every GPU test takes the `cuda` fixture, which skips it - with the reason the module gives - where
the CUDA module is not built, cannot be loaded, or finds no usable GPU. The one CPU-only test here
(TF32 is refused by the CPU module) runs everywhere.

Tolerance between the backends: relative error max|gpu - cpu| / max|cpu| <= 1e-4 (both are float32;
cuDNN and oneDNN may pick different algorithms and summation orders)."""
import numpy as np
import pytest

from deepspot_napari import Model, _core, bundled_weights_path
from deepspot_napari.devices import core_module
from deepspot_napari.train import initial_parameters
from test_model import golden_cases
from test_train import GOLDEN as GOLDEN_TRAIN_STEP, bn_fed_bias, scale, simulated_batch

REL_TOL = 1e-4
WEIGHTS = str(bundled_weights_path())


def rel_error(got, expected):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30))


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def assert_losses_agree(gpu, cpu):
    """(loss, bce, max_term) of both backends: each term within REL_TOL of the total loss (the max
    term alone can be tiny, so its own relative error says little)."""
    assert len(gpu) == len(cpu) == 3
    for what, g, c in zip(("loss", "bce", "max_term"), gpu, cpu):
        assert abs(g - c) <= REL_TOL * abs(cpu[0]), f"{what}: gpu {g!r}, cpu {c!r}"


def assert_backends_agree(gpu, cpu, what="", tol=REL_TOL):
    """The same result from both modules: arrays within `tol` relative error, None where None,
    tuples and lists element by element."""
    if isinstance(cpu, (tuple, list)):
        assert isinstance(gpu, (tuple, list)) and len(gpu) == len(cpu), what
        for i, (g, c) in enumerate(zip(gpu, cpu)):
            assert_backends_agree(g, c, f"{what}[{i}]", tol)
    elif cpu is None:
        assert gpu is None, what
    else:
        assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype, what
        assert rel_error(gpu, cpu) <= tol, f"{what}: relative error {rel_error(gpu, cpu):.2e}"


@pytest.fixture(scope="module")
def cuda():
    """The GPU module, or a skip saying why it cannot run here (no module, no device). Not devices.probe:
    its self-test would turn a wrong GPU result into a skip, and these tests must fail on it."""
    try:
        module = core_module("cuda")
        module.probe()
    except RuntimeError as exc:
        pytest.skip(f"no GPU: {exc}")
    return module


def run_both(cuda, op, *args, **kwargs):
    """(GPU result, CPU result) of the op of that name, on the same inputs."""
    return getattr(cuda, op)(*args, **kwargs), getattr(_core, op)(*args, **kwargs)


def test_cpu_module_refuses_tf32_math():
    with pytest.raises(ValueError, match="(?i)tf32"):
        _core.Network(WEIGHTS, math="tf32")


def test_cuda_module_describes_itself(cuda):
    assert cuda.BACKEND == "cuda" and _core.BACKEND == "cpu"
    assert cuda.probe().strip()
    network = cuda.Network(WEIGHTS)
    assert network.math == "float32"
    assert network.num_parameters == _core.Network(WEIGHTS).num_parameters


# ---------------------------------------------------------------- convolutions

CONV_CASES = {  # n, h, w, cin, cout, k, stride, dilation, pads, transposed
    "stride1_same": (2, 17, 13, 16, 32, 3, 1, 1, (1, 1), False),
    "stride2_tf_same": (2, 32, 24, 32, 64, 3, 2, 1, (0, 1), False),
    "stride2_odd": (1, 13, 7, 4, 6, 3, 2, 1, (1, 1), False),
    "dilation2": (2, 16, 12, 32, 32, 3, 1, 2, (2, 2), False),
    "asymmetric_pad_0_1": (1, 15, 10, 8, 16, 3, 1, 1, (0, 1), False),
    "first_layer_1_channel": (2, 32, 32, 1, 32, 3, 1, 1, (1, 1), False),
    "pointwise_384_to_128": (2, 8, 8, 384, 128, 1, 1, 1, (0, 0), False),
    "head_32_to_1": (2, 16, 16, 32, 1, 1, 1, 1, (0, 0), False),
    "transposed_stride2_network": (2, 8, 8, 128, 256, 3, 2, 1, (0, 1), True),
    "transposed_stride2_odd": (1, 5, 7, 3, 4, 3, 2, 1, (0, 1), True),
    "transposed_stride1": (2, 16, 16, 64, 32, 3, 1, 1, (1, 1), True),
}


def conv_inputs(rng, n, h, w, cin, cout, k):
    x = f32(rng.standard_normal((n, h, w, cin)))
    weight = f32(rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k))
    bias = f32(rng.standard_normal(cout))
    return x, weight, bias


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_and_backward_match_cpu(cuda, rng, case):
    n, h, w, cin, cout, k, stride, dilation, pads, transposed = CONV_CASES[case]
    x, weight, bias = conv_inputs(rng, n, h, w, cin, cout, k)
    options = dict(stride=stride, dilation=dilation, pad_before=pads[0], pad_after=pads[1], transposed=transposed)
    gpu_y, cpu_y = run_both(cuda, "conv2d", x, weight, bias, **options)
    assert_backends_agree(gpu_y, cpu_y, "y")
    dy = f32(rng.standard_normal(cpu_y.shape))
    gpu, cpu = run_both(cuda, "conv2d_backward", x, weight, bias, dy, **options)
    assert_backends_agree(gpu, cpu, "(y, dx, dweight, dbias)")
    gpu, cpu = run_both(cuda, "conv2d_backward", x, weight, bias, dy, **options, need_dx=False)
    assert gpu[1] is None
    assert_backends_agree(gpu, cpu, "(y, None, dweight, dbias)")


@pytest.mark.parametrize("post", ["relu", "sigmoid", "accumulate_relu"])
@pytest.mark.parametrize("transposed", [False, True])
def test_conv2d_post_ops_match_cpu(cuda, rng, post, transposed):
    x, weight, bias = conv_inputs(rng, 2, 9, 11, 24, 16, 3)
    stride, pads = (2, (0, 1)) if transposed else (1, (1, 1))
    options = dict(stride=stride, pad_before=pads[0], pad_after=pads[1], transposed=transposed)
    if post == "accumulate_relu":
        plain = _core.conv2d(x, weight, bias, **options)
        options.update(relu=True, accumulate=f32(rng.standard_normal(plain.shape)))
    else:
        options[post] = True
    gpu, cpu = run_both(cuda, "conv2d", x, weight, bias, **options)
    assert_backends_agree(gpu, cpu, post)


# ---------------------------------------------------------------- batch norm

@pytest.mark.parametrize("shape", [(1, 5, 7, 3), (2, 8, 8, 384), (3, 3, 1, 17)])
def test_batchnorm_relu_matches_cpu(cuda, rng, shape):
    c = shape[3]
    x = f32(rng.standard_normal(shape) * 3)
    gamma, beta, mean = (f32(rng.standard_normal(c)) for _ in range(3))
    variance = f32(rng.uniform(0.01, 4.0, c))
    gpu, cpu = run_both(cuda, "batchnorm_relu", x, gamma, beta, mean, variance, 1e-3)
    assert_backends_agree(gpu, cpu)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (4, 16, 16, 128), (1, 7, 7, 2)])
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_train_matches_cpu(cuda, rng, shape, relu):
    c = shape[3]
    x = f32(rng.standard_normal(shape) * 2 + rng.standard_normal(c))
    gamma, beta = f32(rng.standard_normal(c)), f32(rng.standard_normal(c))
    dy = f32(rng.standard_normal(shape))
    gpu, cpu = run_both(cuda, "batchnorm_train", x, gamma, beta, dy, 1e-3, relu=relu)
    assert_backends_agree(gpu, cpu, "(y, mean, variance, dx, dgamma, dbeta)")


# ---------------------------------------------------------------- max-pool, concat, ReLU, add

@pytest.mark.parametrize("h,w,pads", [(16, 16, (0, 1)), (64, 64, (0, 1)), (9, 13, (1, 1))])
def test_maxpool_forward_and_backward_match_cpu(cuda, rng, h, w, pads):
    x = f32(rng.standard_normal((2, h, w, 32)) - 5.0)  # all negative: padding must not win
    gpu, cpu = run_both(cuda, "maxpool", x, 3, 2, pad_before=pads[0], pad_after=pads[1])
    assert_backends_agree(gpu, cpu, "y")
    dy = f32(rng.standard_normal(cpu.shape))
    gpu, cpu = run_both(cuda, "maxpool_backward", x, dy, 3, 2, pad_before=pads[0], pad_after=pads[1])
    assert_backends_agree(gpu, cpu, "(y, dx)")


def test_concat_and_its_backward_match_cpu(cuda, rng):
    channels = [128, 1, 128, 37]
    parts = [f32(rng.standard_normal((2, 5, 3, c))) for c in channels]
    gpu, cpu = run_both(cuda, "concat", parts)
    assert np.array_equal(gpu, cpu)
    dy = f32(rng.standard_normal(cpu.shape))
    gpu, cpu = run_both(cuda, "concat_backward", dy, channels)
    assert len(gpu) == len(channels) and all(np.array_equal(g, c) for g, c in zip(gpu, cpu))


def test_relu_backward_and_add_match_cpu(cuda, rng):
    y = f32(np.maximum(rng.standard_normal((2, 7, 5, 33)), 0))
    dy = f32(rng.standard_normal(y.shape))
    gpu, cpu = run_both(cuda, "relu_backward", dy, y)
    assert np.array_equal(gpu, cpu)
    b = f32(rng.standard_normal(y.shape))
    gpu, cpu = run_both(cuda, "add", dy, b)
    assert_backends_agree(gpu, cpu)


def test_spatial_dropout_mask_is_identical(cuda, rng):
    x = f32(rng.standard_normal((16, 4, 3, 128)) + 3.0)
    seed, stream = (int(v) for v in rng.integers(0, 2**32, 2))
    (gpu_y, gpu_mask), (cpu_y, cpu_mask) = run_both(cuda, "spatial_dropout", x, 0.2, seed=seed, stream=stream)
    assert np.array_equal(gpu_mask, cpu_mask)
    assert 0 < np.count_nonzero(cpu_mask == 0) < cpu_mask.size  # the mask drops some channels, not all
    assert_backends_agree(gpu_y, cpu_y)


# ---------------------------------------------------------------- loss and Adam

@pytest.mark.parametrize("bce", ["logits", "clipped"])
@pytest.mark.parametrize("max_term", ["batch", "per_image", "none"])
def test_loss_and_its_gradient_match_cpu(cuda, rng, bce, max_term):
    z = f32(rng.standard_normal((4, 32, 24)) * 3)
    z[0, 1, 1] = -25.0  # saturated: p below 1e-7 (clipped in the 'clipped' form)
    t = scale(rng.random(z.shape))
    gpu, cpu = run_both(cuda, "deepspot_loss", z, t, bce=bce, max_term=max_term)
    assert_losses_agree(gpu[:3], cpu[:3])
    assert_backends_agree(gpu[3:], cpu[3:], "(pred, dlogits)")


def test_adam_update_matches_cpu(cuda, rng):
    size = 10_000
    gpu_state = (f32(rng.standard_normal(size)), f32(np.zeros(size)), f32(np.zeros(size)))
    cpu_state = tuple(a.copy() for a in gpu_state)
    for step in range(1, 6):
        grad = f32(rng.standard_normal(size) * 10.0 ** rng.integers(-8, 1, size))
        gpu_state = cuda.adam_update(*gpu_state, grad, step, learning_rate=1e-3)
        cpu_state = _core.adam_update(*cpu_state, grad, step, learning_rate=1e-3)
    assert_backends_agree(gpu_state, cpu_state, "(param, m, v)")


# ---------------------------------------------------------------- the whole network

@pytest.fixture(scope="module")
def gpu_model(cuda):
    return Model.load(device="cuda")


@pytest.mark.parametrize("name,image,expected", golden_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_cuda_network_matches_the_original_tensorflow_model(gpu_model, name, image, expected):
    """The tolerance of test_model.py's CPU parity test."""
    assert gpu_model.device == "cuda"
    got = gpu_model.enhance(image)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-4, name


@pytest.mark.parametrize("first,last", [(0, 2), (0, 0), (1, 1), (2, 2)])
def test_cuda_network_matches_cpu_network(cuda, rng, first, last):
    cpu_network, gpu_network = _core.Network(WEIGHTS), cuda.Network(WEIGHTS)
    x = f32(rng.random((3, 128, 96, 1)))
    if first > 0:  # the input of a later stage: the CPU network's own activations there
        x = cpu_network.forward(x, 0, first - 1)
    assert_backends_agree(gpu_network.forward(x, first, last), cpu_network.forward(x, first, last),
                          f"stages {first}..{last}")


def test_tf32_math_runs_and_stays_close_to_float32(cuda, rng):
    tf32, exact = cuda.Network(WEIGHTS, math="tf32"), cuda.Network(WEIGHTS)
    assert tf32.math == "tf32"
    x = f32(rng.random((2, 256, 256, 1)))
    diff = np.max(np.abs(tf32.forward(x) - exact.forward(x)))
    print(f"TF32 vs float32 sigmoid output: max abs diff {diff:.2e}")
    assert diff < 1e-2


# ---------------------------------------------------------------- training

LR = 1e-4


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_one_training_step_matches_cpu(cuda, dropout):
    """The batch of test_train.py's Keras comparison, one Adam step on each backend from the same
    weights and seed. Acceptance as in test_train.test_one_training_step_matches_keras: Adam's first
    step moves each parameter by about lr * sign(g), so where |g| is near Adam's eps / sqrt(1 - beta2)
    float32 noise can move single values by up to ~lr (a flip at g ~ 0 at most 2 lr); BN-fed biases
    (true gradient 0) are only bounded by one step; BN moving statistics agree to 1e-4."""
    golden = np.load(GOLDEN_TRAIN_STEP)
    x, t = scale(golden["images"]), scale(golden["targets"])
    trainers = [core.Trainer(core.Network(WEIGHTS), learning_rate=LR, dropout=dropout, seed=3)
                for core in (cuda, _core)]
    before = {name: trainers[1].get(name).astype(np.float64) for name in trainers[1].names}
    gpu_loss, cpu_loss = (trainer.step(x, t) for trainer in trainers)
    assert_losses_agree(gpu_loss, cpu_loss)

    outside = total = 0
    update_diffs = []
    for name, start in before.items():
        gpu, cpu = (trainer.get(name).astype(np.float64) for trainer in trainers)
        if ".moving_" in name:
            assert rel_error(gpu, cpu) <= 1e-4, name
        elif bn_fed_bias(name):
            assert np.max(np.abs(gpu - start)) <= LR * 1.001, name
        else:
            assert np.max(np.abs(gpu - cpu)) <= 2 * LR, name
            outside += np.count_nonzero(np.abs(gpu - cpu) / np.max(np.abs(cpu)) > 1e-4)
            total += cpu.size
            update_diffs.append(np.abs(gpu - cpu).ravel() / LR)
    update_diffs = np.concatenate(update_diffs)
    print(f"after one step: {outside} of {total} values differ by more than 1e-4 of their tensor's largest value; "
          f"update / lr differs by median {np.median(update_diffs):.4f}, 99th percentile "
          f"{np.percentile(update_diffs, 99):.4f}")
    assert outside <= 2e-3 * total
    assert np.median(update_diffs) <= 0.005 and np.percentile(update_diffs, 99) <= 0.02


def test_gradients_match_cpu(cuda):
    """Per-tensor relative error of the whole network's gradient, with test_train.py's Keras bounds."""
    golden = np.load(GOLDEN_TRAIN_STEP)
    x, t = scale(golden["images"]), scale(golden["targets"])
    trainers = [core.Trainer(core.Network(WEIGHTS), dropout=0.0) for core in (cuda, _core)]
    gpu_loss, cpu_loss = (trainer.gradients(x, t) for trainer in trainers)
    assert_losses_agree(gpu_loss, cpu_loss)
    errors = {name: rel_error(trainers[0].get("grad." + name), trainers[1].get("grad." + name))
              for name in trainers[1].names if ".moving_" not in name and not bn_fed_bias(name)}
    print(f"{len(errors)} tensors: median {np.median(list(errors.values())):.1e}, worst {max(errors.values()):.1e}")
    assert np.median(list(errors.values())) <= 1e-3 and max(errors.values()) <= 3e-2


def training_losses(core, steps, batch=8, size=64, seed=0):
    """(losses, their floors) of `steps` Adam steps (default learning rate and dropout) from Keras'
    default initialisation, each on a fresh simulated batch. The floor of a batch is its targets'
    own mean entropy, which the BCE against soft targets can never go below."""
    trainer = core.Trainer(core.Network(WEIGHTS), seed=seed)
    for name, value in initial_parameters(trainer, seed=seed).items():
        trainer.set(name, value)
    losses, floors = [], []
    for step in range(steps):
        _, _, x, t = simulated_batch(batch, size, seed=1000 * seed + step)
        tc = np.clip(t.astype(np.float64), 1e-12, 1 - 1e-12)
        floors.append(float(np.mean(-(tc * np.log(tc) + (1 - tc) * np.log(1 - tc)))))
        losses.append(trainer.step(x, t)[0])
    return np.array(losses), np.array(floors)


def test_200_training_steps_lower_the_loss(cuda):
    """From a fresh initialisation on fresh simulated data every step: the mean loss above its floor
    over the last 20 steps is below half that over the first 20. The raw loss falls only ~10 %
    (the floor, ~0.52, dominates it), so the excess is what is compared. Calibrated on the CPU
    with these seeds: ratio 0.41 (another seed: 0.16); when only the head and the last up-block
    learn (the rest reset after every step): 0.58; with no or a wrong gradient it does not fall."""
    losses, floors = training_losses(cuda, 200)
    assert np.all(np.isfinite(losses))
    excess = losses - floors
    first, last = excess[:20].mean(), excess[-20:].mean()
    print(f"loss above its floor: first 20 steps {first:.4f}, last 20 steps {last:.4f} (ratio {last / first:.2f})")
    assert last < 0.5 * first
