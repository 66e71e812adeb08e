"""Each CPU op of the C core against the float64 NumPy reference, on fresh random inputs
(odd sizes included): relative error max|got - ref| / max|ref| <= 1e-5."""
import numpy as np
import pytest

import reference as ref
from deepspot_napari import _core

REL_TOL = 1e-5


def rel_error(got, expected):
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30))


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,dilation,pads", [
    (1, 9, 11, 3, 5, 3, 1, 1, (1, 1)),      # odd sizes, 'same'
    (2, 16, 16, 1, 32, 3, 2, 1, (0, 1)),    # TF stride-2 'same' on even sizes
    (1, 13, 7, 4, 6, 3, 2, 1, (1, 1)),      # stride 2, odd sizes
    (2, 12, 10, 5, 7, 3, 1, 2, (2, 2)),     # atrous
    (1, 8, 8, 384, 128, 1, 1, 1, (0, 0)),   # the trunk's 1x1
    (1, 7, 9, 32, 1, 1, 1, 1, (0, 0)),      # the head
])
def test_conv2d_matches_reference(rng, n, h, w, cin, cout, k, stride, dilation, pads):
    x = rng.standard_normal((n, h, w, cin))
    weight = rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)
    bias = rng.standard_normal(cout)
    got = _core.conv2d(f32(x), f32(weight), f32(bias), stride=stride, dilation=dilation,
                       pad_before=pads[0], pad_after=pads[1])
    expected = ref.conv2d(f32(x), f32(weight), f32(bias), stride, dilation, *pads)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= REL_TOL


@pytest.mark.parametrize("n,h,w,cin,cout,stride,pads", [
    (1, 5, 7, 3, 4, 2, (0, 1)),    # Keras Conv2DTranspose s2 'same': 2H x 2W
    (2, 8, 8, 16, 8, 2, (0, 1)),
    (1, 9, 6, 6, 5, 1, (1, 1)),    # s1 'same'
    (1, 4, 4, 2, 3, 2, (1, 1)),    # symmetric padding: 2H - 1
])
def test_conv2d_transpose_matches_reference(rng, n, h, w, cin, cout, stride, pads):
    x = rng.standard_normal((n, h, w, cin))
    weight = rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)
    bias = rng.standard_normal(cout)
    got = _core.conv2d(f32(x), f32(weight), f32(bias), stride=stride, pad_before=pads[0], pad_after=pads[1],
                       transposed=True)
    expected = ref.conv2d_transpose(f32(x), f32(weight), f32(bias), stride, *pads)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= REL_TOL


def test_transposed_conv_is_the_adjoint_of_conv(rng):
    """<conv(x), y> == <x, conv_transpose(y)> with the same weights and padding (bias zero)."""
    x = rng.standard_normal((1, 10, 10, 3))
    y = rng.standard_normal((1, 5, 5, 4))
    weight = rng.standard_normal((4, 3, 3, 3))
    conv_x = _core.conv2d(f32(x), f32(weight), f32(np.zeros(4)), stride=2, pad_before=0, pad_after=1)
    adj_y = _core.conv2d(f32(y), f32(weight.transpose(1, 0, 2, 3)), f32(np.zeros(3)), stride=2, pad_before=0,
                         pad_after=1, transposed=True)
    lhs = np.sum(conv_x.astype(np.float64) * y)
    rhs = np.sum(f32(x).astype(np.float64) * adj_y)
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1.0)


def test_conv2d_post_ops_match_reference(rng):
    x = rng.standard_normal((2, 7, 9, 6))
    weight = rng.standard_normal((5, 6, 3, 3)) / 4
    bias = rng.standard_normal(5)
    residual = rng.standard_normal((2, 7, 9, 5))
    conv = ref.conv2d(f32(x), f32(weight), f32(bias), 1, 1, 1, 1)
    got_sum_relu = _core.conv2d(f32(x), f32(weight), f32(bias), pad_before=1, pad_after=1, relu=True,
                                accumulate=f32(residual))
    assert rel_error(got_sum_relu, ref.relu(conv + f32(residual))) <= REL_TOL
    got_sigmoid = _core.conv2d(f32(x), f32(weight), f32(bias), pad_before=1, pad_after=1, sigmoid=True)
    assert rel_error(got_sigmoid, ref.sigmoid(conv)) <= REL_TOL


@pytest.mark.parametrize("shape", [(1, 5, 7, 3), (2, 8, 8, 384), (3, 3, 1, 17)])
def test_batchnorm_relu_matches_reference(rng, shape):
    c = shape[3]
    x = rng.standard_normal(shape) * 3
    gamma, beta, mean = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c)
    variance = rng.uniform(0.01, 4.0, c)
    got = _core.batchnorm_relu(f32(x), f32(gamma), f32(beta), f32(mean), f32(variance), 1e-3)
    expected = ref.relu(ref.batchnorm(f32(x), f32(gamma), f32(beta), f32(mean), f32(variance), 1e-3))
    assert rel_error(got, expected) <= REL_TOL


@pytest.mark.parametrize("h,w,pads", [(16, 16, (0, 1)), (9, 13, (1, 1)), (6, 5, (1, 1))])
def test_maxpool_matches_reference_and_ignores_padding(rng, h, w, pads):
    x = rng.standard_normal((2, h, w, 7)) - 5.0  # all negative: padding must not win
    got = _core.maxpool(f32(x), 3, 2, pad_before=pads[0], pad_after=pads[1])
    expected = ref.maxpool(f32(x), 3, 2, *pads)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= REL_TOL


def test_concat_matches_numpy(rng):
    parts = [rng.standard_normal((2, 5, 3, c)) for c in (3, 1, 6)]
    got = _core.concat([f32(p) for p in parts])
    assert np.array_equal(got, np.concatenate([f32(p) for p in parts], axis=3))


def test_ops_reject_bad_arguments():
    x = np.zeros((1, 4, 4, 2), np.float32)
    with pytest.raises(TypeError, match="float32"):
        _core.conv2d(x.astype(np.float64), np.zeros((1, 2, 3, 3), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="weight"):
        _core.conv2d(x, np.zeros((1, 3, 3, 3), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="empty output"):
        _core.conv2d(x, np.zeros((1, 2, 7, 7), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="differ"):
        _core.concat([x, np.zeros((1, 5, 4, 2), np.float32)])
    with pytest.raises(ValueError):
        _core.maxpool(x, 3, 0)
