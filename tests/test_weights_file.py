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


def test_the_model_card_holds_what_the_committed_reports_give():
    """weights/README.md's figures are made by tools/model_card.py from docs/accuracy/general/ (written by
    tools/report_general_model.sh): a report regenerated without rewriting the card fails here."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("model_card", root / "tools" / "model_card.py")
    model_card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_card)
    readme = (root / "weights" / "README.md").read_text()
    block = readme.split(model_card.BEGIN, 1)[1].split(model_card.END, 1)[0]
    assert block.strip() == model_card.card().strip()


def test_the_general_model_is_the_default_and_the_published_one_loads_by_name():
    from deepspot_napari.model import BUNDLED_MODELS, DEFAULT_MODEL, bundled_models
    assert DEFAULT_MODEL == "general" and bundled_models() == ["general", "hybrid"] == list(BUNDLED_MODELS)
    general, hybrid = Model.load(), Model.load("hybrid")
    assert general.path.name == "deepspot_general.safetensors" and hybrid.path.name == "deepspot_hybrid.safetensors"
    assert general.target_background == 0.5 and hybrid.target_background is None
    assert general.detection.threshold == 0.85 and general.detection.subpixel == "gaussian"
    image = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    assert not np.array_equal(general.enhance(image), hybrid.enhance(image))
