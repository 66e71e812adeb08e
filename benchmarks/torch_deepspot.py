"""The DeepSpot network in PyTorch (eager, NCHW), for benchmarking our C core against PyTorch + cuDNN
on the same architecture (benchmarks/bench_gpu.py). A benchmark-only file: the package never imports
PyTorch.

The wiring is that of tests/reference.py `deepspot_logits` (docs/reference_model.md section 1), with its
TF 'same' padding (`reference.same_padding`): symmetric padding is the convolution's own, the
asymmetric 0-before/1-after padding of the stride-2 convolutions and max-pools is F.pad (with -inf for
the pools), and a stride-2 transposed conv is computed whole and cropped by the same padding
(F.pad with negative amounts) - PyTorch's ConvTranspose2d(padding=1, output_padding=1) would be shifted
by one pixel. Parameters load from the safetensors file under the same names; BatchNorm has Keras'
epsilon 1e-3 and momentum 0.99 (PyTorch momentum 0.01); dropout is Dropout2d (SpatialDropout2D).

    model = DeepSpotTorch.from_safetensors(path)     # eval mode, on the CPU
    model(x)          # x [n, 1, h, w] float32 in [0, 1], h and w multiples of 8 -> sigmoid map
    model.logits(x)   # the head's logits
    verify_against_core(model)   # max |PyTorch - _core.Network| on a random 128x128 image, <= 1e-4
"""
from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from reference import same_padding  # noqa: E402  (the one definition of TF 'same')

BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99
DROPOUT = 0.2
CASO_PATHS = ("strided", "maxpool", "atrous")
CASO_WIDTHS = (32, 64, 128)
TRUNK_BLOCKS = 13
DECODER_WIDTHS = ((128, 256, 128), (128, 128, 64), (64, 64, 32))  # (in, convt1 out, block out) per up-block


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=1 - KERAS_BN_MOMENTUM)


class _Counter:
    """Multiply-adds x 2 of every convolution run while it is active (see DeepSpotTorch.flops)."""
    flops = None


def _conv(x, layer: nn.Conv2d):
    """A Conv2d layer with TF 'same' padding for x's size."""
    k, stride, dilation = layer.kernel_size[0], layer.stride[0], layer.dilation[0]
    before, after = same_padding(x.shape[2], stride, (k - 1) * dilation + 1)
    if before == after:
        y = F.conv2d(x, layer.weight, layer.bias, stride, before, dilation)
    else:
        y = F.conv2d(F.pad(x, (before, after, before, after)), layer.weight, layer.bias, stride, 0, dilation)
    if _Counter.flops is not None:
        _Counter.flops += 2 * k * k * layer.in_channels * layer.out_channels * y.shape[2] * y.shape[3] * y.shape[0]
    return y


def _conv_transpose(x, layer: nn.ConvTranspose2d):
    """A ConvTranspose2d layer with Keras 'same' padding: output size = input size x stride."""
    k, stride = layer.kernel_size[0], layer.stride[0]
    before, after = same_padding(x.shape[2] * stride, stride, k)
    if before == after:
        y = F.conv_transpose2d(x, layer.weight, layer.bias, stride, before)
    else:
        y = F.pad(F.conv_transpose2d(x, layer.weight, layer.bias, stride), (-before, -after, -before, -after))
    if _Counter.flops is not None:  # counted on the input side
        _Counter.flops += 2 * k * k * layer.in_channels * layer.out_channels * x.shape[2] * x.shape[3] * x.shape[0]
    return y


def _maxpool(x):
    before, after = same_padding(x.shape[2], 2, 3)
    if before or after:
        x = F.pad(x, (before, after, before, after), value=float("-inf"))
    return F.max_pool2d(x, 3, 2)


class _CasoPath(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        stride, dilation = (2, 1) if path == "strided" else (1, 2 if path == "atrous" else 1)
        widths = (1,) + CASO_WIDTHS
        for i in (1, 2, 3):
            self.add_module(f"conv{i}", nn.Conv2d(widths[i - 1], widths[i], 3, stride, 0, dilation))
            self.add_module(f"bn{i}", _bn(widths[i]))

    def forward(self, x):
        for i in (1, 2, 3):
            x = F.relu(getattr(self, f"bn{i}")(_conv(x, getattr(self, f"conv{i}"))))
            if self.path != "strided":
                x = _maxpool(x)
        return x


class _Shortcut(nn.Module):
    def __init__(self, conv: nn.Module, channels: int, transposed: bool):
        super().__init__()
        self.add_module("convt" if transposed else "conv", conv)
        self.bn = _bn(channels)
        self.transposed = transposed

    def forward(self, x):
        return self.bn(_conv_transpose(x, self.convt) if self.transposed else _conv(x, self.conv))


class _TrunkBlock(nn.Module):
    """Full pre-activation bottleneck: (BN-ReLU-Conv) x 3 (1x1, 3x3, 1x1), spatial dropout, + shortcut."""

    def __init__(self, in_channels: int, channels: int = 128):
        super().__init__()
        widths = (in_channels, channels, channels, channels)
        for i, k in zip((1, 2, 3), (1, 3, 1)):
            self.add_module(f"bn{i}", _bn(widths[i - 1]))
            self.add_module(f"conv{i}", nn.Conv2d(widths[i - 1], widths[i], k))
        self.dropout = nn.Dropout2d(DROPOUT)
        if in_channels != channels:
            self.shortcut = _Shortcut(nn.Conv2d(in_channels, channels, 1), channels, transposed=False)

    def forward(self, x):
        h = x
        for i in (1, 2, 3):
            h = _conv(F.relu(getattr(self, f"bn{i}")(h)), getattr(self, f"conv{i}"))
        return self.dropout(h) + (self.shortcut(x) if hasattr(self, "shortcut") else x)


class _UpBlock(nn.Module):
    """ConvT s2 - BN - ReLU - ConvT - BN - ReLU - ConvT - BN, dropout, + (ConvT s2 - BN), ReLU."""

    def __init__(self, in_channels: int, wide: int, out: int):
        super().__init__()
        self.convt1, self.bn1 = nn.ConvTranspose2d(in_channels, wide, 3, 2), _bn(wide)
        self.convt2, self.bn2 = nn.ConvTranspose2d(wide, out, 3, 1), _bn(out)
        self.convt3, self.bn3 = nn.ConvTranspose2d(out, out, 3, 1), _bn(out)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.shortcut = _Shortcut(nn.ConvTranspose2d(in_channels, out, 3, 2), out, transposed=True)

    def forward(self, x):
        h = F.relu(self.bn1(_conv_transpose(x, self.convt1)))
        h = F.relu(self.bn2(_conv_transpose(h, self.convt2)))
        h = self.bn3(_conv_transpose(h, self.convt3))
        return F.relu(self.dropout(h) + self.shortcut(x))


class DeepSpotTorch(nn.Module):
    def __init__(self):
        super().__init__()
        self.caso = nn.ModuleDict({path: _CasoPath(path) for path in CASO_PATHS})
        self.trunk = nn.ModuleDict({f"block{b:02d}": _TrunkBlock(384 if b == 1 else 128)
                                    for b in range(1, TRUNK_BLOCKS + 1)})
        self.decoder = nn.ModuleDict({f"up{j}": _UpBlock(*widths) for j, widths in enumerate(DECODER_WIDTHS, 1)})
        self.head = nn.Module()
        self.head.conv = nn.Conv2d(32, 1, 1)

    def logits(self, x):
        """x [n, 1, h, w] (scaled to [0, 1]; h, w multiples of 8) -> the head's logits [n, 1, h, w]."""
        t = torch.cat([self.caso[path](x) for path in CASO_PATHS], dim=1)
        for block in self.trunk.values():
            t = block(t)
        for block in self.decoder.values():
            t = block(t)
        return _conv(t, self.head.conv)

    def forward(self, x):
        return torch.sigmoid(self.logits(x))

    # ------------------------------------------------------------------ weights

    @staticmethod
    def torch_name(name: str) -> str:
        """The state_dict key of a safetensors tensor name."""
        for keras, ours in ((".gamma", ".weight"), (".beta", ".bias"), (".moving_mean", ".running_mean"),
                            (".moving_variance", ".running_var")):
            if name.endswith(keras):
                return name[: -len(keras)] + ours
        return name

    def load_parameters(self, params: dict[str, np.ndarray]) -> "DeepSpotTorch":
        """Copies every tensor of the weights file in (all must be used, all must be present).
        Transposed-conv kernels are [out, in, k, k] in the file and [in, out, k, k] in PyTorch."""
        state = {}
        for name, value in params.items():
            value = np.asarray(value, np.float32)
            if ".convt" in name and name.endswith(".weight"):
                value = value.transpose(1, 0, 2, 3)
            state[self.torch_name(name)] = torch.from_numpy(np.ascontiguousarray(value))
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the architecture: missing {missing}, unexpected {unexpected}")
        return self

    @classmethod
    def from_safetensors(cls, path: str | Path) -> "DeepSpotTorch":
        return cls().load_parameters(read_safetensors(path)).eval()

    def flops(self, height: int, width: int) -> int:
        """FLOPs of one forward on one image: 2 * k * k * Cin * Cout * Hout * Wout per convolution,
        transposed convolutions counted by their input side (docs/reference_model.md section 1.6). Runs a copy of
        the model on PyTorch's meta device (no compute)."""
        meta = copy.deepcopy(self).to("meta").eval()
        _Counter.flops = 0
        try:
            with torch.no_grad():
                meta.logits(torch.empty((1, 1, height, width), device="meta"))
            return _Counter.flops
        finally:
            _Counter.flops = None


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a float32 safetensors file (the `safetensors` package when installed)."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        with open(path, "rb") as f:  # the format: u64 header length, JSON header, raw data
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
            data = f.read()
        header.pop("__metadata__", None)
        out = {}
        for name, info in header.items():
            if info["dtype"] != "F32":
                raise ValueError(f"{name}: dtype {info['dtype']}, expected F32")
            begin, end = info["data_offsets"]
            out[name] = np.frombuffer(data[begin:end], "<f4").reshape(info["shape"])
        return out
    return load_file(str(path))


def verify_against_core(model: DeepSpotTorch, weights_path: str | Path | None = None, device: str = "cpu",
                        size: int = 128, tol: float = 1e-4, seed: int = 0) -> float:
    """Max |PyTorch - our CPU core| of the sigmoid map of one random size x size image, the core's
    Network loaded from `weights_path` (None: the bundled weights, which the model must hold too);
    raises AssertionError above `tol`. PyTorch runs on `device` with TF32 off."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from checkout import import_package
    import_package()
    from deepspot_napari import _core, bundled_weights_path

    x = np.random.default_rng(seed).random((1, size, size, 1), dtype=np.float32)
    expected = _core.Network(str(weights_path or bundled_weights_path())).forward(x)[..., 0]
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            got = model(torch.from_numpy(x[..., 0][:, None]).to(device))[:, 0].cpu().numpy()
    finally:
        model.train(was_training)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
    diff = float(np.max(np.abs(got - expected)))
    assert diff <= tol, f"the PyTorch model differs from _core.Network by {diff:.2e} (> {tol:g})"
    return diff
