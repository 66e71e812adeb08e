"""Each training op of the C core (forward in training mode and backward) against finite differences
of the float64 NumPy reference (tests/reference.py), on fresh random inputs with odd sizes:
relative error max|got - fd| / max|fd| <= 1e-3 (observed: about 1e-7)."""
import numpy as np
import pytest

import reference as ref
from deepspot_napari import _core

REL_TOL = 1e-3
FWD_TOL = 1e-5


def rel_error(got, expected):
    return float(np.max(np.abs(np.asarray(got, np.float64) - expected)) / max(np.max(np.abs(expected)), 1e-30))


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def fd(f, x, eps=1e-6):
    return ref.numerical_gradient(f, np.asarray(x, np.float64), eps)


# ---------------------------------------------------------------- convolutions

@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,dilation,pads", [
    (1, 7, 9, 3, 4, 3, 1, 1, (1, 1)),     # odd sizes, 'same'
    (2, 6, 6, 2, 3, 3, 2, 1, (0, 1)),     # TF stride-2 'same' on even sizes
    (1, 7, 5, 2, 3, 3, 2, 1, (1, 1)),     # stride 2, odd sizes
    (2, 7, 6, 2, 3, 3, 1, 2, (2, 2)),     # atrous
    (2, 3, 5, 6, 4, 1, 1, 1, (0, 0)),     # 1x1
])
def test_conv_backward_matches_finite_differences(rng, n, h, w, cin, cout, k, stride, dilation, pads):
    x = f32(rng.standard_normal((n, h, w, cin)))
    weight = f32(rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k))
    bias = f32(rng.standard_normal(cout))
    expected_y = ref.conv2d(x, weight, bias, stride, dilation, *pads)
    dy = f32(rng.standard_normal(expected_y.shape))
    y, dx, dw, db = _core.conv2d_backward(x, weight, bias, dy, stride=stride, dilation=dilation,
                                          pad_before=pads[0], pad_after=pads[1])
    assert rel_error(y, expected_y) <= FWD_TOL

    def loss(xx=x, ww=weight, bb=bias):
        return float(np.sum(ref.conv2d(xx, ww, bb, stride, dilation, *pads) * dy))

    assert rel_error(dx, fd(lambda v: loss(xx=v), x)) <= REL_TOL
    assert rel_error(dw, fd(lambda v: loss(ww=v), weight)) <= REL_TOL
    assert rel_error(db, fd(lambda v: loss(bb=v), bias)) <= REL_TOL
    _, no_dx, dw2, _ = _core.conv2d_backward(x, weight, bias, dy, stride=stride, dilation=dilation,
                                             pad_before=pads[0], pad_after=pads[1], need_dx=False)
    assert no_dx is None and np.array_equal(dw2, dw)


@pytest.mark.parametrize("n,h,w,cin,cout,stride,pads", [
    (1, 3, 5, 3, 4, 2, (0, 1)),   # Keras Conv2DTranspose s2 'same'
    (2, 4, 4, 2, 3, 2, (0, 1)),
    (1, 5, 3, 3, 2, 1, (1, 1)),   # s1 'same'
])
def test_transposed_conv_backward_matches_finite_differences(rng, n, h, w, cin, cout, stride, pads):
    x = f32(rng.standard_normal((n, h, w, cin)))
    weight = f32(rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9))
    bias = f32(rng.standard_normal(cout))
    expected_y = ref.conv2d_transpose(x, weight, bias, stride, *pads)
    dy = f32(rng.standard_normal(expected_y.shape))
    y, dx, dw, db = _core.conv2d_backward(x, weight, bias, dy, stride=stride, pad_before=pads[0],
                                          pad_after=pads[1], transposed=True)
    assert rel_error(y, expected_y) <= FWD_TOL

    def loss(xx=x, ww=weight, bb=bias):
        return float(np.sum(ref.conv2d_transpose(xx, ww, bb, stride, *pads) * dy))

    assert rel_error(dx, fd(lambda v: loss(xx=v), x)) <= REL_TOL
    assert rel_error(dw, fd(lambda v: loss(ww=v), weight)) <= REL_TOL
    assert rel_error(db, fd(lambda v: loss(bb=v), bias)) <= REL_TOL


# ---------------------------------------------------------------- batch norm (training mode)

@pytest.mark.parametrize("shape,relu", [((2, 5, 3, 4), False), ((3, 3, 5, 3), True), ((1, 7, 7, 2), True)])
def test_batchnorm_train_backward_matches_finite_differences(rng, shape, relu):
    c = shape[3]
    x = f32(rng.standard_normal(shape) * 2 + rng.standard_normal(c))
    gamma, beta = f32(rng.standard_normal(c)), f32(rng.standard_normal(c))
    dy = f32(rng.standard_normal(shape))
    y, mean, var, dx, dgamma, dbeta = _core.batchnorm_train(x, gamma, beta, dy, 1e-3, relu=relu)
    expected, expected_mean, expected_var = ref.batchnorm_train(x, gamma, beta, 1e-3)
    if relu:
        expected = ref.relu(expected)
    assert rel_error(y, expected) <= FWD_TOL
    assert rel_error(mean, expected_mean) <= FWD_TOL
    assert rel_error(var, expected_var) <= FWD_TOL  # biased (divided by N), as Keras normalises

    def loss(xx=x, gg=gamma, bb=beta):
        out = ref.batchnorm_train(xx, gg, bb, 1e-3)[0]
        return float(np.sum((ref.relu(out) if relu else out) * dy))

    assert rel_error(dx, fd(lambda v: loss(xx=v), x)) <= REL_TOL
    assert rel_error(dgamma, fd(lambda v: loss(gg=v), gamma)) <= REL_TOL
    assert rel_error(dbeta, fd(lambda v: loss(bb=v), beta)) <= REL_TOL


# ---------------------------------------------------------------- max-pool, concat, ReLU, add

@pytest.mark.parametrize("h,w,pads", [(8, 8, (0, 1)), (7, 9, (1, 1)), (5, 4, (1, 1))])
def test_maxpool_backward_matches_finite_differences(rng, h, w, pads):
    x = f32(rng.standard_normal((2, h, w, 3)))
    expected = ref.maxpool(x, 3, 2, *pads)
    dy = f32(rng.standard_normal(expected.shape))
    y, dx = _core.maxpool_backward(x, dy, 3, 2, pad_before=pads[0], pad_after=pads[1])
    assert np.array_equal(y, expected.astype(np.float32))
    expected_dx = fd(lambda v: float(np.sum(ref.maxpool(v, 3, 2, *pads) * dy)), x)
    assert rel_error(dx, expected_dx) <= REL_TOL


def test_concat_backward_splits_the_gradient(rng):
    channels = [3, 1, 5]
    dy = f32(rng.standard_normal((2, 3, 5, sum(channels))))
    parts = _core.concat_backward(dy, channels)
    xs = [f32(rng.standard_normal((2, 3, 5, c))) for c in channels]
    for i, part in enumerate(parts):
        def loss(v, i=i):
            return float(np.sum(np.concatenate(xs[:i] + [v] + xs[i + 1:], axis=3) * dy))
        assert rel_error(part, fd(loss, xs[i])) <= REL_TOL


def test_relu_backward_and_add(rng):
    x = f32(rng.standard_normal((2, 5, 3, 4)))
    dy = f32(rng.standard_normal(x.shape))
    got = _core.relu_backward(dy, np.maximum(x, 0))
    assert rel_error(got, fd(lambda v: float(np.sum(ref.relu(v) * dy)), x)) <= REL_TOL
    b = f32(rng.standard_normal(x.shape))
    assert np.array_equal(_core.add(x, b), x + b)


@pytest.mark.parametrize("relu", [False, True], ids=["trunk", "decoder"])
def test_add_backward_hands_the_gradient_to_both_inputs(rng, relu):
    """A residual junction as the network has them: y = [relu](conv(x) + x) (the trunk's identity
    blocks; the decoder's with the ReLU). Its backward gives dy (through the ReLU) unchanged to both
    inputs of the add, and x, read by both branches, sums the two gradients with _core.add: checked
    against finite differences of the float64 reference of the whole junction."""
    x = f32(rng.standard_normal((2, 5, 7, 3)))
    weight = f32(rng.standard_normal((3, 3, 3, 3)) / 3)
    bias = f32(rng.standard_normal(3))
    dy = f32(rng.standard_normal(x.shape))

    def junction(v):
        total = ref.conv2d(v, weight, bias, 1, 1, 1, 1) + v
        return ref.relu(total) if relu else total

    y = _core.add(f32(ref.conv2d(x, weight, bias, 1, 1, 1, 1)), x)
    assert rel_error(y, ref.conv2d(x, weight, bias, 1, 1, 1, 1) + x) <= FWD_TOL
    d_sum = _core.relu_backward(dy, np.maximum(y, 0)) if relu else dy  # the add's output gradient
    _, d_main, _, _ = _core.conv2d_backward(x, weight, bias, d_sum, pad_before=1, pad_after=1)
    dx = _core.add(d_main, d_sum)  # the add gives d_sum to the conv's output and to the shortcut x
    expected = fd(lambda v: float(np.sum(junction(v) * dy)), x)
    assert rel_error(dx, expected) <= REL_TOL
    # neither branch alone is the gradient: the check sees a missing half
    assert rel_error(d_main, expected) > 0.1 and rel_error(d_sum, expected) > 0.1


# ---------------------------------------------------------------- spatial dropout

def test_spatial_dropout_masks_whole_channels_and_is_seeded(rng):
    x = f32(rng.standard_normal((16, 4, 3, 64)) + 3.0)
    y, mask = _core.spatial_dropout(x, 0.2, seed=5, stream=11)
    assert mask.shape == (16, 64)
    assert set(np.unique(mask)) <= {0.0, np.float32(1.25)}
    assert 0.12 < np.mean(mask == 0) < 0.28
    assert np.array_equal(y, x * mask[:, None, None, :])
    y2, mask2 = _core.spatial_dropout(x, 0.2, seed=5, stream=11)
    assert np.array_equal(mask, mask2) and np.array_equal(y, y2)
    _, mask3 = _core.spatial_dropout(x, 0.2, seed=5, stream=12)
    assert not np.array_equal(mask, mask3)
    _, ones = _core.spatial_dropout(x, 0.0)
    assert np.all(ones == 1.0)
    # the backward is the same masking, i.e. the derivative of the forward with the mask fixed
    dy = f32(rng.standard_normal(x[:2, :2, :2, :3].shape))
    xs = x[:2, :2, :2, :3].copy()
    dx, m = _core.spatial_dropout(dy, 0.2, seed=5, stream=11)
    expected = fd(lambda v: float(np.sum(v * m[:, None, None, :] * dy)), xs)
    assert rel_error(dx, expected) <= REL_TOL


# ---------------------------------------------------------------- loss

@pytest.mark.parametrize("bce", ["logits", "clipped"])
@pytest.mark.parametrize("max_term", ["batch", "per_image", "none"])
def test_loss_and_its_gradient_match_finite_differences(rng, bce, max_term):
    z = f32(rng.standard_normal((3, 5, 7)) * 3)
    z[0, 1, 1] = -25.0  # saturated: p below 1e-7 (clipped in the 'clipped' form)
    t = f32(rng.random(z.shape))
    t /= t.reshape(3, -1).max(axis=1)[:, None, None]
    loss, bce_value, max_value, pred, dz = _core.deepspot_loss(z, t, bce=bce, max_term=max_term)
    expected = ref.deepspot_loss(z, t, bce, max_term)
    # the clipped form works on p in float32 (as Keras): log(1 - p) loses digits where p is near 1
    assert abs(loss - expected) <= (1e-6 if bce == "logits" else 1e-4) * abs(expected)
    assert abs(bce_value + max_value - loss) <= 1e-12
    assert rel_error(pred, ref.sigmoid(z.astype(np.float64))) <= 1e-6
    assert rel_error(dz, fd(lambda v: ref.deepspot_loss(v, t, bce, max_term), z)) <= REL_TOL


def test_loss_bce_forms_differ_where_keras_clips():
    z = f32(np.full((1, 1, 2), -30.0))
    t = f32(np.array([[[0.5, 1.0]]]))
    logits_form = _core.deepspot_loss(z, t, bce="logits", max_term="none")[0]
    clipped_form = _core.deepspot_loss(z, t, bce="clipped", max_term="none")[0]
    assert logits_form == pytest.approx(ref.deepspot_loss(z, t, "logits", "none"), rel=1e-6)
    assert clipped_form == pytest.approx(-0.75 * np.log(1e-7) - 0.25 * np.log(1 - 1e-7), rel=1e-5)
    assert logits_form > 1.5 * clipped_form
    assert np.all(_core.deepspot_loss(z, t, bce="clipped", max_term="none")[4] == 0)  # clipped: no gradient


def test_loss_max_term_ties_share_the_gradient():
    z = f32(np.array([[[1.0, 2.0, 2.0, 0.5]]]))
    t = f32(np.array([[[0.0, 1.0, 0.2, 0.1]]]))
    _, _, max_value, pred, dz = _core.deepspot_loss(z, t, max_term="batch")
    p = ref.sigmoid(np.float64(2.0))
    assert max_value == pytest.approx((p - 1.0) ** 2, rel=1e-6)
    bce_grad = (ref.sigmoid(z.astype(np.float64)) - t) / 4
    share = 2 * (p - 1.0) / 2 * p * (1 - p)
    expected = bce_grad.copy()
    expected[0, 0, 1:3] += share
    assert rel_error(dz, expected) <= 1e-5


# ---------------------------------------------------------------- Adam

def test_adam_matches_the_keras_formula(rng):
    param = rng.standard_normal(1000)
    m = np.zeros(1000)
    v = np.zeros(1000)
    p32, m32, v32 = f32(param), f32(m), f32(v)
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-7
    for step in range(1, 6):
        grad = rng.standard_normal(1000) * 10.0 ** rng.integers(-8, 1, 1000)
        m += (grad - m) * (1 - b1)
        v += (grad * grad - v) * (1 - b2)
        param -= lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step) * m / (np.sqrt(v) + eps)
        p32, m32, v32 = _core.adam_update(p32, m32, v32, f32(grad), step, learning_rate=lr)
    assert np.max(np.abs(p32 - param)) <= 1e-6
    assert rel_error(m32, m) <= 1e-5 and rel_error(v32, v) <= 1e-5


def test_training_ops_reject_bad_arguments():
    x = np.zeros((1, 4, 4, 2), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="dy"):
        _core.conv2d_backward(x, w, np.zeros(3, np.float32), np.zeros((1, 4, 4, 2), np.float32), pad_before=1,
                              pad_after=1)
    with pytest.raises(ValueError, match="shape"):
        _core.deepspot_loss(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="max_term"):
        _core.deepspot_loss(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.float32), max_term="mean")
    with pytest.raises(ValueError, match="sum of channels"):
        _core.concat_backward(x, [1, 2])
    with pytest.raises(ValueError, match="rate"):
        _core.spatial_dropout(x, 1.0)
