"""The `deepspot` command line end to end on small files: demo, enhance, detect, run, simulate;
a corrupt file in a batch is reported and skipped; --resume skips finished outputs; nothing is
overwritten silently."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import deepspot_napari
from deepspot_napari.cli import main


@pytest.fixture
def images(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    from deepspot_napari.simulate import simulate_image
    for i in range(2):
        image, _ = simulate_image(rng, "ds_var", n_spots=30, size=128)
        tifffile.imwrite(folder / f"field{i}.tif", image)
    image, _ = simulate_image(rng, "code", n_spots=20, size=64)
    Image.fromarray(image).save(folder / "field2.png")
    return folder


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_demo_reports_f1_and_writes_outputs(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    f1 = float(out.split("F1 ")[1].split()[0])
    assert f1 >= 0.9, out
    assert "ambiguous: an annotation whose nearest detection is already another annotation's" in out
    assert "one-to-one F1: each detection matches at most one annotation (Hungarian matching" in out
    for name in ("sample.enhanced.tif", "sample.spots.csv", "sample.overlay.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    found = len(read_rows(tmp_path / "demo" / "sample.spots.csv")) - 1
    truth = int(out.split("annotated spots")[0].split()[-1])
    assert overlay_legend(tmp_path / "demo" / "sample.overlay.png") == \
        f"green circles: {truth} ground-truth spots; red crosses: {found} spots detected"


def overlay_legend(path):
    """The legend's text (also stored in the PNG), after checking that it is drawn below the image."""
    with Image.open(path) as im:
        legend, pixels = im.info["legend"], np.asarray(im.convert("RGB"))
    rows = legend.count(";") + 1
    band = pixels[-(18 * rows + 4):]
    assert ((band[..., 0] > 150) & (band[..., 1] < 100)).any()  # the red text of the detections' line
    return legend


def test_demo_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "sample.spots.csv").write_text("mine")
    assert main(["demo", "-o", str(out), "-q"]) == 2
    assert "sample.spots.csv exists: pass --overwrite" in capsys.readouterr().err
    assert (out / "sample.spots.csv").read_text() == "mine" and not (out / "sample.enhanced.tif").exists()
    assert main(["demo", "-o", str(out), "-q", "--overwrite"]) == 0
    assert (out / "sample.spots.csv").read_text().startswith("y,x")


def test_run_enhances_and_detects_every_input(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(images), "-o", str(out), "--save-enhanced", "-q"]) == 0
    for stem in ("field0", "field1", "field2"):
        rows = read_rows(out / f"{stem}.spots.csv")
        assert rows[0] == ["y", "x", "score", "intensity", "size"]
        assert len(rows) > 5
        assert tifffile.imread(out / f"{stem}.enhanced.tif").dtype == np.float32
    assert "3 done, 0 skipped, 0 failed" in capsys.readouterr().out


def test_overlay_marks_and_counts_the_spots_of_every_image_and_report_lists_them(images, tmp_path, capsys):
    from deepspot_napari.simulate import simulate_image
    rng = np.random.default_rng(3)
    tifffile.imwrite(images / "stack.tif", np.stack([simulate_image(rng, "ds_var", n_spots=15, size=64)[0]
                                                     for _ in range(3)]))
    out = tmp_path / "out"
    assert main(["run", str(images), "-o", str(out), "--overlay", "-q"]) == 0
    report = (out / "report.md").read_text()
    for stem, side in (("field0", 128), ("field1", 128), ("field2", 64), ("stack", 64)):  # the stack: its projection
        count = len(read_rows(out / f"{stem}.spots.csv")) - 1
        assert count > 5 and overlay_legend(out / f"{stem}.overlay.png") == f"red crosses: {count} spots detected"
        with Image.open(out / f"{stem}.overlay.png") as im:
            assert im.size[0] >= 2 * side and im.size[1] > 2 * side
        row = next(line for line in report.splitlines() if line.startswith(f"| {stem}."))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1:3] == ["done", str(count)] and float(cells[3]) > 0
        assert cells[4] == f"[{stem}.overlay.png]({stem}.overlay.png)"
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    assert main(["run", str(images), "-o", str(out), "--overlay", "-q"]) == 2  # no silent overwrite of the report
    assert "report.md exists: pass --overwrite or --resume" in capsys.readouterr().err
    assert main(["detect", str(out / "field0.overlay.png"), "-o", str(tmp_path / "d"), "-q"]) == 0
    assert not (tmp_path / "d" / "field0.overlay.overlay.png").exists()  # only with --overlay


def test_a_tiny_or_pure_noise_image_is_warned_about_once_and_its_spots_still_written(images, tmp_path, capsys, rng):
    tifffile.imwrite(images / "tiny.tif", rng.integers(100, 200, (4, 4), dtype=np.uint16))
    tifffile.imwrite(images / "noise.tif", rng.normal(1000, 30, (128, 128)).astype(np.uint16))
    out = tmp_path / "out"
    assert main(["run", str(images), "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warned) == 3, err  # the tiny image: too small and noise; the noise image: noise
    assert sum(line.startswith("deepspot run: warning: tiny.tif: the image is only 4x4 px") for line in warned) == 1
    assert sum(line.startswith("deepspot run: warning: noise.tif: the image shows no structure above noise")
               for line in warned) == 1
    assert all((out / f"{stem}.spots.csv").is_file() for stem in ("tiny", "noise", "field0", "field1", "field2"))


def test_unlikely_input_tells_noise_from_spots(rng):
    from deepspot_napari.images import unlikely_input
    from deepspot_napari.simulate import simulate_image
    assert unlikely_input(simulate_image(rng, "ds_var", n_spots=1, size=256)[0]) == []
    assert all(unlikely_input(simulate_image(rng, "code", n_spots=20, size=64)[0]) == [] for _ in range(10))  # dense
    for noise in (rng.normal(100, 10, (512, 512)), rng.poisson(2, (256, 256)), rng.normal(100, 10, (3, 64, 64))):
        assert [reason.split(" (")[0] for reason in unlikely_input(noise)] == ["the image shows no structure above noise"]


def test_enhance_then_detect_equals_run(images, tmp_path):
    assert main(["enhance", str(images / "field0.tif"), "-o", str(tmp_path / "e"), "-q"]) == 0
    assert main(["detect", str(tmp_path / "e" / "field0.enhanced.tif"), "-o", str(tmp_path / "d"), "-q"]) == 0
    assert main(["run", str(images / "field0.tif"), "-o", str(tmp_path / "r"), "-q"]) == 0
    detected = read_rows(tmp_path / "d" / "field0.enhanced.spots.csv")
    ran = read_rows(tmp_path / "r" / "field0.spots.csv")
    assert [r[:3] for r in detected] == [r[:3] for r in ran]


def test_corrupt_file_is_reported_and_skipped(images, tmp_path, capsys):
    (images / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "out"
    assert main(["run", str(images), "-o", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("broken.tif") == 1  # in the table at the end, once
    assert "3 done, 0 skipped, 1 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["field0.spots.csv", "field1.spots.csv", "field2.spots.csv"]


def test_resume_skips_and_nothing_is_overwritten_silently(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(images / "field0.tif"), "-o", str(out), "-q"]) == 0
    before = (out / "field0.spots.csv").stat().st_mtime_ns
    assert main(["run", str(images), "-o", str(out), "--resume", "-q"]) == 0
    assert "2 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "field0.spots.csv").stat().st_mtime_ns == before
    assert main(["run", str(images), "-o", str(out), "-q"]) == 1  # outputs exist, no flag
    assert "0 done, 0 skipped, 3 failed" in capsys.readouterr().out
    assert (out / "field0.spots.csv").stat().st_mtime_ns == before
    assert main(["run", str(images / "field0.tif"), "-o", str(out), "--overwrite", "-q"]) == 0
    assert (out / "field0.spots.csv").stat().st_mtime_ns != before


def test_simulate_writes_a_dataset(tmp_path):
    assert main(["simulate", str(tmp_path / "sim"), "-n", "3", "--recipe", "ds_fixed", "--spots", "10", "20"]) == 0
    assert len(list((tmp_path / "sim" / "images").iterdir())) == 3
    assert len(list((tmp_path / "sim" / "csv").iterdir())) == 3


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing*.tif"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["demo", "--weights", str(tmp_path / "nope.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_device_choice_and_its_errors(images, tmp_path, capsys, monkeypatch):
    """--device cpu runs and says so once on stderr; an unknown device is refused by the parser;
    TF32 on the CPU and a GPU that does not work end as the usual one-line error (exit code 2)."""
    from deepspot_napari import devices
    source = str(images / "field0.tif")
    assert main(["enhance", source, "-o", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count(f"deepspot: device: cpu ({devices.probe('cpu')[1]}), float32") == 1
    assert (tmp_path / "cpu" / "field0.enhanced.tif").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["enhance", source, "-o", str(tmp_path / "bogus"), "--device", "bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main(["enhance", source, "-o", str(tmp_path / "tf32"), "--device", "cpu", "--precision", "tf32"]) == 2
    assert "deepspot enhance: error: precision 'tf32' needs the GPU backend" in capsys.readouterr().err
    monkeypatch.setattr(devices, "probe", lambda device: (False, "no usable CUDA device: simulated"))
    assert main(["run", source, "-o", str(tmp_path / "cuda"), "--device", "cuda"]) == 2
    assert "deepspot run: error: device 'cuda' requested but it cannot run here: no usable CUDA device: simulated" \
        in capsys.readouterr().err
    assert not (tmp_path / "tf32").exists() and not (tmp_path / "cuda").exists()  # refused before any output


@pytest.mark.parametrize("command", ["demo", "enhance", "run", "train", "evaluate"])
def test_every_model_command_takes_device_and_precision(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage = capsys.readouterr().out
    assert "--device {auto,cpu,cuda}" in usage and "--precision {auto,float32,tf32,bf16}" in usage


def run_program(tmp_path, *args):
    """The command line as a separate program, importing the same deepspot_napari as this test (installed or in-tree)."""
    env = {**os.environ, "PYTHONPATH": str(Path(deepspot_napari.__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "deepspot_napari.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env)


def test_help_runs_as_a_program(tmp_path):
    result = run_program(tmp_path, "--help")
    assert result.returncode == 0 and "deepspot demo" in result.stdout


def test_version_names_the_package_weights_and_devices(tmp_path):
    from deepspot_napari.devices import available_devices
    from deepspot_napari.model import weights_path
    result = run_program(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"deepspot {deepspot_napari.__version__} ")
    assert f"default weights: {weights_path(None)}" in result.stdout
    for name, description in available_devices():
        assert f"device {name}: {description}" in result.stdout


def help_text(capsys, *command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


@pytest.mark.parametrize("command", ["demo", "enhance", "run", "detect", "simulate", "evaluate", "train"])
def test_every_subcommand_help_ends_with_examples_and_every_flag_is_explained(command, capsys):
    from deepspot_napari.cli import build_parser
    text = help_text(capsys, command)
    examples = text.split(" examples: ")[-1]
    assert examples.count(f"deepspot {command} ") >= 2, text
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_help_shows_the_defaults(capsys):
    from deepspot_napari.train import DEFAULT_EPOCHS, DEFAULT_PATCH_SIZE
    train = help_text(capsys, "train")
    for flag, default in (("--epochs", DEFAULT_EPOCHS), ("--batch-size", 8), ("--learning-rate", "1e-4"),
                          ("--patch-size", DEFAULT_PATCH_SIZE), ("--seed", 0)):
        assert f"default {default}" in train.split(flag)[2] or f"default: {default}" in train.split(flag)[2], flag
    model_default = "(default: the model's own, see docs/detection_defaults.md)"
    run = help_text(capsys, "run")
    assert all(model_default in run.split(flag)[2] for flag in ("--method", "--threshold", "--min-distance", "--subpixel"))
    assert "--tile-size TILE_SIZE window side" in run and "(default: 1056)" in run.split("--tile-size")[2]
    detect = help_text(capsys, "detect")  # the enhancing model's own (--weights)
    assert all(model_default in detect.split(flag)[2] for flag in ("--method", "--threshold", "--subpixel"))
    assert "the model that enhanced the images" in detect.split("--weights")[2]


def test_evaluate_finetune_reports_before_and_after_on_the_other_half(tmp_path, capsys):
    sim = tmp_path / "sim"
    assert main(["simulate", str(sim), "-n", "1", "--recipe", "hybrid", "--size", "192", "--spots", "40"]) == 0
    spec = f"toy={sim / 'images' / '0000.tif'},{sim / 'csv' / '0000.csv'}"
    out = tmp_path / "ft"
    args = ["evaluate", "--finetune", spec, "-o", str(out), "--epochs", "2", "--seeds", "1", "--no-bigfish", "-q"]
    assert main(args) == 0
    text = (out / "finetune.md").read_text()
    rows = list(csv.DictReader(open(out / "finetune.csv")))
    assert [(r["trained_on"].split()[0], r["scored_on"].split()[0]) for r in rows] == [("left", "right"),
                                                                                      ("right", "left")]
    assert all(0 <= float(r["after_f1"]) <= 1 and r["epochs"] == "2" for r in rows), rows
    assert "at most 2 epochs" in text and "| toy |" in text and (out / "finetune_curves.png").stat().st_size > 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["evaluate", "--finetune", "-o", str(tmp_path / "none")]) == 2
    assert "needs annotated images" in capsys.readouterr().err


def test_simulate_spots_on_a_real_background(tmp_path):
    background = tmp_path / "background.tif"
    tifffile.imwrite(background, (1000 + 200 * np.add.outer(np.arange(96), np.arange(96)) / 96).astype(np.uint16))
    out = tmp_path / "bg"
    assert main(["simulate", str(out), "-n", "2", "--size", "64", "--spots", "5", "9", "--recipe", "realistic",
                 "--kinds", "real", "--background", str(background)]) == 0
    image = tifffile.imread(out / "images" / "0001.tif")
    spots = np.loadtxt(out / "csv" / "0001.csv", delimiter=",", skiprows=1).reshape(-1, 2)
    assert image.dtype in (np.uint8, np.uint16) and image.shape == (64, 64) and 5 <= len(spots) <= 9
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 40, 40), np.uint16))
    assert main(["simulate", str(tmp_path / "x"), "--recipe", "realistic", "--background", str(tmp_path / "stack.tif")]) == 2
    assert main(["simulate", str(tmp_path / "y"), "--background", str(background)]) == 2  # not the realistic recipe
    assert main(["simulate", str(tmp_path / "z"), "--recipe", "realistic", "--kinds", "real"]) == 2  # no sources


def test_train_prints_each_epoch_resumes_after_an_interruption_and_the_weights_run(tmp_path, capsys, monkeypatch):
    from deepspot_napari import cli
    sim = tmp_path / "sim"
    assert main(["simulate", str(sim), "-n", "5", "--recipe", "hybrid", "--size", "64", "--spots", "10", "20"]) == 0
    run = tmp_path / "run"
    common = ["train", str(sim), "-o", str(run), "--batch-size", "2", "--patch-size", "64", "--validation-split", "0.34"]
    labels = []

    def ctrl_c_in_epoch_2(bar, done, total):  # the user presses Ctrl-C during the second epoch
        labels.append(f"{bar.label} {done}/{total} {bar.unit}")
        if bar.label.startswith("train epoch 2/"):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.Progress, "__call__", ctrl_c_in_epoch_2)
    assert main([*common, "--epochs", "3"]) == 130
    captured = capsys.readouterr()
    epoch_lines = [line.split() for line in captured.out.splitlines() if line.startswith("    ")]
    assert [row[0] for row in epoch_lines] == ["1"] and len(epoch_lines[0]) == 5  # epoch, loss, val loss, F1, s
    assert labels[0].startswith("train epoch 1/3 1/") and labels[0].endswith(" steps")
    resume = captured.err.split("Continue with:\n")[1].strip()
    assert resume == "deepspot " + " ".join([*common, "--epochs", "3", "--resume"])
    monkeypatch.undo()

    assert main([*common, "--epochs", "3"]) == 2  # the run exists: no silent restart
    assert "--resume" in capsys.readouterr().err
    assert main([*common, "--epochs", "3", "--resume", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot --resume the run in" in err and "batch_size: 2 there, 4 now" in err and "(-o)" in err
    assert "checkpoint_dir" not in err and "resume=False" not in err
    assert main(resume.split()[1:] + ["-q"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("    ")][:1] == ["2"]  # not again from 1
    assert (run / "best.safetensors").exists() and (run / "curves.png").exists()
    assert main(["run", str(sim / "images"), "-o", str(tmp_path / "spots"), "--weights", str(run / "best.safetensors"),
                 "-q"]) == 0
    assert main(["train", "-o", str(tmp_path / "empty"), "--epochs", "1"]) == 2
    assert "nothing to train on" in capsys.readouterr().err


def test_train_warns_of_incomplete_annotations_unless_the_check_is_skipped(tmp_path, capsys):
    sim = tmp_path / "sim"
    assert main(["simulate", str(sim), "-n", "1", "--recipe", "hybrid", "--size", "128", "--spots", "60", "60"]) == 0
    csv = sim / "csv" / "0000.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:1] + lines[1::3]) + "\n")  # two spots in three left unmarked
    common = ["train", str(sim), "--epochs", "1", "--batch-size", "2", "--patch-size", "64", "--validation-split", "0.25",
              "-q"]
    assert main([*common, "-o", str(tmp_path / "checked")]) == 0
    assert "strong spots there that have no annotation" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "unchecked"), "--no-annotation-check"]) == 0
    assert "strong spots there that have no annotation" not in capsys.readouterr().err
