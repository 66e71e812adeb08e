"""Float64 NumPy reference implementations of the network's layers (NHWC), written from the
definitions (TF/Keras semantics), independent of the C core. The tests compare the C ops with these."""
import numpy as np


def conv2d(x, weight, bias, stride=1, dilation=1, pad_before=0, pad_after=0):
    """y[n,p,q,o] = b[o] + sum_{c,i,j} x[n, p*s - pb + i*d, q*s - pb + j*d, c] * w[o,c,i,j] (zeros outside)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    n, h, wd, _ = x.shape
    out_c, _, k, _ = w.shape
    span = (k - 1) * dilation + 1
    xp = np.pad(x, ((0, 0), (pad_before, pad_after), (pad_before, pad_after), (0, 0)))
    oh = (h + pad_before + pad_after - span) // stride + 1
    ow = (wd + pad_before + pad_after - span) // stride + 1
    y = np.zeros((n, oh, ow, out_c)) + np.asarray(bias, np.float64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, i * dilation: i * dilation + (oh - 1) * stride + 1: stride,
                       j * dilation: j * dilation + (ow - 1) * stride + 1: stride, :]
            y += patch @ w[:, :, i, j].T
    return y


def conv2d_transpose(x, weight, bias, stride=1, pad_before=0, pad_after=0):
    """The adjoint of conv2d: each input pixel scatters w[o,c,i,j] * x to y[p*s - pb + i, q*s - pb + j, o]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    n, h, wd, _ = x.shape
    out_c, _, k, _ = w.shape
    full_h, full_w = (h - 1) * stride + k, (wd - 1) * stride + k
    full = np.zeros((n, full_h, full_w, out_c))
    for i in range(k):
        for j in range(k):
            full[:, i: i + (h - 1) * stride + 1: stride, j: j + (wd - 1) * stride + 1: stride, :] += x @ w[:, :, i, j].T
    return full[:, pad_before: full_h - pad_after, pad_before: full_w - pad_after, :] + np.asarray(bias, np.float64)


def batchnorm(x, gamma, beta, mean, variance, epsilon=1e-3):
    x = np.asarray(x, np.float64)
    return (x - mean) / np.sqrt(np.asarray(variance, np.float64) + epsilon) * gamma + beta


def relu(x):
    return np.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def maxpool(x, kernel, stride, pad_before=0, pad_after=0):
    x = np.asarray(x, np.float64)
    xp = np.pad(x, ((0, 0), (pad_before, pad_after), (pad_before, pad_after), (0, 0)), constant_values=-np.inf)
    n, h, w, c = xp.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    y = np.full((n, oh, ow, c), -np.inf)
    for i in range(kernel):
        for j in range(kernel):
            y = np.maximum(y, xp[:, i: i + (oh - 1) * stride + 1: stride, j: j + (ow - 1) * stride + 1: stride, :])
    return y


def same_padding(size, stride, span):
    """TF 'same': output ceil(size/stride); the odd padding pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def deepspot_logits(x, params, batchnorm_fn, dropout_masks=None):
    """The whole network (docs/reference_model.md section 1) in float64 up to the head's logits [n, h, w, 1];
    x is [n, h, w, 1] scaled to [0, 1]; params maps the safetensors names to arrays;
    batchnorm_fn(t, name) is the BatchNorm flavour (moving or batch statistics). dropout_masks:
    training with spatial dropout, block name ("trunk.block01", "decoder.up1", ...) -> [n, channels]
    factors (0, or 1 / (1 - rate)) for the end of that block's main path; None: no dropout."""
    p, bn = params, batchnorm_fn

    def dropout(t, name):
        return t if dropout_masks is None else t * dropout_masks[name][:, None, None, :]

    def conv(t, name, stride=1, dilation=1):
        k = p[name + ".weight"].shape[2]
        before, after = same_padding(t.shape[1], stride, (k - 1) * dilation + 1)
        return conv2d(t, p[name + ".weight"], p[name + ".bias"], stride, dilation, before, after)

    def convt(t, name, stride):
        before, after = same_padding(t.shape[1] * stride, stride, 3)
        return conv2d_transpose(t, p[name + ".weight"], p[name + ".bias"], stride, before, after)

    def pool(t):
        before, after = same_padding(t.shape[1], 2, 3)
        return maxpool(t, 3, 2, before, after)

    paths = []
    for path in ("strided", "maxpool", "atrous"):
        t = x
        for i in (1, 2, 3):
            name = f"caso.{path}"
            if path == "strided":
                t = relu(bn(conv(t, f"{name}.conv{i}", stride=2), f"{name}.bn{i}"))
            else:
                t = pool(relu(bn(conv(t, f"{name}.conv{i}", dilation=2 if path == "atrous" else 1), f"{name}.bn{i}")))
        paths.append(t)
    t = np.concatenate(paths, axis=3)
    for b in range(1, 14):
        name = f"trunk.block{b:02d}"
        h = t
        for i in (1, 2, 3):
            h = conv(relu(bn(h, f"{name}.bn{i}")), f"{name}.conv{i}")
        shortcut = bn(conv(t, f"{name}.shortcut.conv"), f"{name}.shortcut.bn") if b == 1 else t
        t = dropout(h, name) + shortcut
    for j in (1, 2, 3):
        name = f"decoder.up{j}"
        h = relu(bn(convt(t, f"{name}.convt1", 2), f"{name}.bn1"))
        h = relu(bn(convt(h, f"{name}.convt2", 1), f"{name}.bn2"))
        h = dropout(bn(convt(h, f"{name}.convt3", 1), f"{name}.bn3"), name)
        t = relu(h + bn(convt(t, f"{name}.shortcut.convt", 2), f"{name}.shortcut.bn"))
    return conv(t, "head.conv")


def deepspot_logits_inference(x, params, epsilon=1e-3, dropout_masks=None):
    """The network up to the head's logits [n, h, w, 1] with BatchNorm on the moving statistics
    (inference, and training with frozen batch norms; dropout_masks as in deepspot_logits)."""
    def bn(t, name):
        return batchnorm(t, params[name + ".gamma"], params[name + ".beta"], params[name + ".moving_mean"],
                         params[name + ".moving_variance"], epsilon)
    return deepspot_logits(x, params, bn, dropout_masks)


def deepspot_forward(x, params, epsilon=1e-3):
    """The network at inference (BatchNorm with the moving statistics): the sigmoid map [n, h, w, 1]."""
    return sigmoid(deepspot_logits_inference(x, params, epsilon))
# ---------------------------------------------------------------- training (float64)

def batchnorm_train(x, gamma, beta, epsilon=1e-3):
    """Batch norm on the batch statistics (biased variance, as Keras normalises); returns y, mean, variance."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=(0, 1, 2))
    variance = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta, mean, variance


def log1p_exp_neg_abs(z):
    return np.log1p(np.exp(-np.abs(z)))


def deepspot_loss(logits, target, bce="logits", max_term="batch"):
    """The training loss on the head's logits [n, h, w] (docs/reference_model.md section 2):
    mean BCE (Keras on a sigmoid output: the logits form; or the clipped-probability form) plus
    (max p - max t)^2 over the whole batch ("batch") or averaged per image ("per_image")."""
    z = np.asarray(logits, np.float64)
    t = np.asarray(target, np.float64)
    p = sigmoid(z)
    if bce == "logits":
        terms = np.maximum(z, 0) - z * t + log1p_exp_neg_abs(z)
    else:
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        terms = -(t * np.log(pc) + (1 - t) * np.log(1 - pc))
    bce_value = terms.mean()
    if max_term == "batch":
        m = (p.max() - t.max()) ** 2
    elif max_term == "per_image":
        m = np.mean((p.reshape(len(p), -1).max(axis=1) - t.reshape(len(t), -1).max(axis=1)) ** 2)
    else:
        m = 0.0
    return bce_value + m


def deepspot_logits_train(x, params, epsilon=1e-3, dropout_masks=None):
    """The whole network in training mode (batch statistics; dropout off, or dropout_masks as in
    deepspot_logits) up to the head's logits; x [n, h, w, 1]; returns [n, h, w]."""
    def bn(t, name):
        return batchnorm_train(t, params[name + ".gamma"], params[name + ".beta"], epsilon)[0]
    return deepspot_logits(x, params, bn, dropout_masks)[..., 0]
def numerical_gradient(f, x, eps=1e-6):
    """Central differences of the scalar f at every element of the float64 array x."""
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = f(x)
        flat[i] = saved - eps
        down = f(x)
        flat[i] = saved
        g[i] = (up - down) / (2 * eps)
    return grad
