"""The strict safetensors reader in C: every malformed or mismatched weights file is a clear
Python exception, never a crash; a valid file round-trips through our writer."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from deepspot_napari import Model, bundled_weights_path
from deepspot_napari.safetensors_io import save_safetensors


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(bundled_weights_path()))


def header_and_data(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_writer_round_trips_through_the_c_reader(tmp_path, tensors):
    path = tmp_path / "copy.safetensors"
    save_safetensors(path, tensors, {"format": "deepspot-napari/1"})
    model = Model.load(path)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    assert np.array_equal(model.enhance(image), Model.load().enhance(image))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [0, 5, 8, 100, 5000, -4])
def test_truncated_file(tmp_path, cut):
    raw = bundled_weights_path().read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    with pytest.raises(ValueError, match="truncated|too short|header|data"):
        Model.load(path)


def test_missing_tensor(tmp_path, tensors):
    path = tmp_path / "missing.safetensors"
    save_safetensors(path, {k: v for k, v in tensors.items() if k != "trunk.block07.conv2.weight"})
    with pytest.raises(ValueError, match="lacks tensor 'trunk.block07.conv2.weight'"):
        Model.load(path)


def test_extra_tensor(tmp_path, tensors):
    path = tmp_path / "extra.safetensors"
    save_safetensors(path, {**tensors, "head.extra": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor 'head.extra'"):
        Model.load(path)


def test_wrong_shape(tmp_path, tensors):
    path = tmp_path / "shape.safetensors"
    save_safetensors(path, {**tensors, "head.conv.weight": np.zeros((1, 16, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"head.conv.weight.*\[1,16,1,1\].*expected \[1,32,1,1\]"):
        Model.load(path)


def test_wrong_dtype(tmp_path, tensors):
    path = tmp_path / "dtype.safetensors"
    save_safetensors(path, tensors)
    header, data = header_and_data(path)
    header["head.conv.bias"]["dtype"] = "F16"
    write_raw(path, header, data)
    with pytest.raises(ValueError, match="dtype F16; expected F32"):
        Model.load(path)


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["head.conv.bias"].update(data_offsets=[0, 4]), "overlap|gap|bytes"),
    (lambda h: h["head.conv.bias"].update(shape=[2]), "bytes of data"),
    (lambda h: h["head.conv.bias"].update(data_offsets=[10**12, 10**12 + 4]), "truncated"),
    (lambda h: h["head.conv.bias"].update(extra=1), "unknown key"),
    (lambda h: h["head.conv.bias"].pop("shape"), "lacks"),
])
def test_inconsistent_header(tmp_path, tensors, edit, message):
    path = tmp_path / "header.safetensors"
    save_safetensors(path, tensors)
    header, data = header_and_data(path)
    edit(header)
    write_raw(path, header, data)
    with pytest.raises(ValueError, match=message):
        Model.load(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    body = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # unterminated
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(ValueError, match="safetensors"):
        Model.load(path)


def test_nan_weights_are_rejected(tmp_path, tensors):
    path = tmp_path / "nan.safetensors"
    save_safetensors(path, tensors)
    header, data = header_and_data(path)
    begin = header["head.conv.bias"]["data_offsets"][0]
    data = data[:begin] + struct.pack("<f", float("nan")) + data[begin + 4:]
    write_raw(path, header, data)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Model.load(path)
