"""The ``skid`` command line, end to end through subprocesses, and its error paths."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from skid import NetworkCompressor, cli
from skid._demo import load_digits_images, train_digits_cnn

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "COLUMNS": "120"}


def run_skid(*args, cwd=None, timeout=120):
    """``python -m skid ARGS`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "skid", *map(str, args)],
        capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout,
    )


@pytest.fixture(scope="module")
def digits():
    X_train, X_test, y_train, y_test = load_digits_images()
    return X_train, X_test


@pytest.fixture(scope="module")
def trained(digits):
    torch.set_num_threads(2)
    return train_digits_cnn(digits[0][:600], load_digits_images()[2][:600], epochs=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained, digits):
    """A saved whole model and calibration data in .npy form."""
    folder = tmp_path_factory.mktemp("cli")
    torch.save(trained, folder / "model.pt")
    np.save(folder / "calib.npy", digits[0][:400])
    return folder


def module(model, name):
    return dict(model.named_modules())[name]


def out_width(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# --------------------------------------------------------------------------- skid demo


def test_demo_prints_one_row_per_setting_and_saves_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    start = time.perf_counter()
    result = run_skid("demo", "--plot", tmp_path / "demo.png")
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("setting"))
    for column in ("FLOPs kept", "params kept", "widths", "accuracy", "agreement", "time (s)"):
        assert column in header
    settings = [line.split()[0] for line in lines if re.match(r"(original|tol=|target_)", line)]
    expected = [f"tol={t:g}" for t in cli.DEMO_TOLS]
    expected += [f"target_flops={f:g}" for f in cli.DEMO_TARGET_FLOPS]
    assert settings == ["original", *expected]
    half = next(line for line in lines if line.startswith("target_flops=0.5")).split()
    assert float(half[1].rstrip("%")) <= 50.0 + 1e-9  # FLOPs kept
    assert float(half[5]) >= 0.9  # agreement; measured 0.98 or more
    assert re.fullmatch(r"\d+-\d+-\d+", half[3])  # one width per prunable layer
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seconds < 60, f"skid demo took {seconds:.0f} s; it must stay well under a minute"


def test_demo_table_agreement_grows_as_tol_shrinks(capsys, monkeypatch, trained):
    monkeypatch.setattr("skid._demo.train_digits_cnn", lambda *args, **kwargs: trained)
    assert cli.main(["demo", "--tol", "0.3", "--tol", "0.01", "--target-flops", "0.3"]) == 0
    rows = {
        line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
        if re.match(r"(original|tol=|target_)", line)
    }
    assert list(rows) == ["original", "tol=0.3", "tol=0.01", "target_flops=0.3"]
    flops = {name: float(row[1].rstrip("%")) for name, row in rows.items()}
    agreement = {name: float(row[5]) for name, row in rows.items()}
    assert flops["original"] == 100.0 and agreement["original"] == 1.0
    assert flops["tol=0.3"] < flops["tol=0.01"] < 100.0
    assert agreement["tol=0.3"] <= agreement["tol=0.01"]
    assert flops["target_flops=0.3"] <= 30.0 + 1e-9


def test_demo_plot_without_matplotlib_fails_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr("skid._demo.train_digits_cnn", _fail_if_called)
    assert cli.main(["demo", "--plot", str(tmp_path / "x.png")]) == cli.EXIT_USAGE
    assert "pip install 'skid[plot]'" in capsys.readouterr().err


def test_demo_plot_into_a_missing_folder_fails_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("skid._demo.train_digits_cnn", _fail_if_called)
    assert cli.main(["demo", "--plot", str(tmp_path / "no" / "x.png")]) == cli.EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the demo trained a model before checking its options")


# --------------------------------------------------------------------------- skid compress


def test_compress_round_trip_saved_model_matches_report(files, trained, digits):
    result = run_skid(
        "compress", files / "model.pt", "--data", files / "calib.npy", "--tol", "0.05",
        "--out", files / "small.pt", "--report", files / "report.json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((files / "report.json").read_text())
    small = torch.load(files / "small.pt", weights_only=False)
    assert len(report["layers"]) == 3
    for layer in report["layers"]:
        assert out_width(module(small, layer["producer"])) == layer["width_after"]
        assert layer["width_after"] < layer["width_before"]
        assert f"{layer['width_before']} -> {layer['width_after']}" in result.stdout
        assert 0 <= layer["error"] <= 0.05
    # the same settings in-process give the same model
    expected = NetworkCompressor(tol=0.05).fit(trained, torch.as_tensor(digits[0][:400]))
    assert [layer["width_after"] for layer in expected.layers_] == [
        layer["width_after"] for layer in report["layers"]
    ]
    assert report["flops"] == {k: int(v) for k, v in expected.flops_.items()}
    assert report["n_calibration_samples"] == 400
    X_test = torch.as_tensor(digits[1])
    with torch.no_grad():
        np.testing.assert_allclose(  # float32 GEMMs round differently across thread counts
            small(X_test).numpy(), expected.compressed_model_(X_test).numpy(), atol=2e-4
        )
        agreement = (small(X_test).argmax(1) == trained(X_test).argmax(1)).float().mean()
    assert agreement >= 0.9
    assert "FLOPs per sample" in result.stdout
    assert "calibration" in result.stderr  # the tqdm progress bar


def test_compress_target_flops_and_exclude(files):
    excluded = "0"  # the first conv: its channels are never pruned
    result = run_skid(
        "compress", files / "model.pt", "--data", files / "calib.npy", "--target-flops",
        "0.5", "--exclude", f"{excluded},", "--out", files / "half.pt", "--report",
        files / "half.json", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    report = json.loads((files / "half.json").read_text())
    assert report["flops"]["after"] <= 0.5 * report["flops"]["before"] * (1 + 1e-9)
    assert excluded not in [layer["producer"] for layer in report["layers"]]
    assert report["settings"]["target_flops"] == 0.5


def test_compress_accepts_npz_and_pt_data(files, digits, capsys):
    np.savez(files / "two.npz", X=digits[0][:200], other=np.zeros(3))
    torch.save(torch.as_tensor(digits[0][:200], dtype=torch.float64), files / "calib.pt")
    common = ["--rank", "0.5", "--out", str(files / "r.pt"), "--quiet"]
    for data in (["two.npz", "--data-key", "X"], ["calib.pt"]):
        argv = ["compress", str(files / "model.pt"), "--data", str(files / data[0]), *data[1:]]
        assert cli.main(argv + common) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def test_missing_model_file_exits_3_without_traceback(files, tmp_path):
    result = run_skid("compress", tmp_path / "nope.pt", "--data", files / "calib.npy",
                      "--out", tmp_path / "out.pt")
    assert result.returncode == cli.EXIT_INPUT
    assert "model file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_conflicting_width_options_exit_2(files, tmp_path):
    result = run_skid("compress", files / "model.pt", "--data", files / "calib.npy",
                      "--tol", "0.1", "--rank", "0.5", "--out", tmp_path / "out.pt")
    assert result.returncode == cli.EXIT_USAGE
    assert "not allowed with argument" in result.stderr


def test_model_rejecting_the_data_exits_1(files, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((10, 3, 5, 5), dtype=np.float32))
    result = run_skid("compress", files / "model.pt", "--data", tmp_path / "bad.npy",
                      "--out", tmp_path / "out.pt")
    assert result.returncode == cli.EXIT_FAILED
    assert "(10, 3, 5, 5)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_nothing_prunable_exits_4(tmp_path):
    torch.save(nn.Sequential(nn.Linear(4, 3)), tmp_path / "tiny.pt")
    np.save(tmp_path / "x.npy", np.ones((8, 4), dtype=np.float32))
    result = run_skid("compress", tmp_path / "tiny.pt", "--data", tmp_path / "x.npy",
                      "--out", tmp_path / "out.pt")
    assert result.returncode == cli.EXIT_NOT_PRUNABLE
    assert "nothing to prune" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--data", "missing.npy"], cli.EXIT_INPUT, "calibration data file not found"),
        (["--target-flops", "1.5"], cli.EXIT_USAGE, r"1.5 is not in \(0.0, 1.0\)"),
        (["--tol", "abc"], cli.EXIT_USAGE, "'abc' is not a number"),
        (["--batch-size", "0"], cli.EXIT_USAGE, "0 must be >= 1"),
        (["--out", "{folder}/model.pt"], cli.EXIT_USAGE, "--out is the input model"),
        (["--out", "{folder}/no/such/dir/x.pt"], cli.EXIT_INPUT, "does not exist"),
        (["--data", "{folder}/empty.npy"], cli.EXIT_INPUT, "holds no samples"),
        (["--data", "{folder}/words.npy"], cli.EXIT_INPUT, "not numbers"),
        (["--data", "{folder}/model.pt"], cli.EXIT_INPUT, "cannot read"),
        (["--data", "{folder}/many.npz"], cli.EXIT_INPUT, "pass --data-key with one of a, b"),
        (["--data", "{folder}/many.npz", "--data-key", "c"], cli.EXIT_INPUT, "no array 'c'"),
        (["--device", "cudda"], cli.EXIT_USAGE, "--device cudda: "),
        (["--exclude", "0,featurs"], cli.EXIT_USAGE, "no module 'featurs'"),
        (["--exclude", "100"], cli.EXIT_USAGE, "no module '100'; did you mean '10'"),
        (["--data", "{folder}/nan.npy"], cli.EXIT_FAILED, r"NaN .*nan.npy: shape \(20, 1, 8, 8\)"),
    ],
)
def test_bad_options_and_data_give_clear_errors(files, argv, code, message, capsys):
    np.save(files / "empty.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    np.save(files / "words.npy", np.array(["a", "b"]))
    np.savez(files / "many.npz", a=np.zeros(2), b=np.zeros(2))
    np.save(files / "nan.npy", np.full((20, 1, 8, 8), np.nan, dtype=np.float32))
    options = {"--data": str(files / "calib.npy"), "--out": str(files / "o.pt")}
    argv = [arg.format(folder=files) for arg in argv]
    for name, default in options.items():
        if name not in argv:
            argv += [name, default]
    assert exit_code(["compress", str(files / "model.pt"), *argv]) == code
    assert re.search(message, capsys.readouterr().err)


def exit_code(argv):
    """``cli.main(argv)``'s exit code, also when argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("state_dict", "not a model; save the whole model"),
        ("tensor", "holds a Tensor, not a torch.nn.Module"),
        ("script", "is a TorchScript archive"),
        ("export", "is a torch.export archive"),
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_files_that_are_not_eager_models_exit_3(files, tmp_path, payload, message, capsys):
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))
    obj = {"state_dict": model.state_dict(), "tensor": torch.zeros(2)}.get(payload)
    path = tmp_path / "m.pt"
    if payload == "script":
        torch.jit.script(model).save(str(path))
    elif payload == "export":
        torch.export.save(torch.export.export(model, (torch.zeros(2, 64),)), str(path))
    else:
        torch.save(obj, path)
    argv = ["compress", str(path), "--data", str(files / "calib.npy"), "--out",
            str(tmp_path / "o.pt")]
    assert cli.main(argv) == cli.EXIT_INPUT
    assert message in capsys.readouterr().err


def test_model_whose_class_cannot_be_imported_exits_3(files, tmp_path):
    script = tmp_path / "make.py"
    script.write_text(
        "import torch\n"
        "class Net(torch.nn.Sequential):\n    pass\n"
        "torch.save(Net(torch.nn.Linear(2, 2)), 'net.pt')\n"
    )
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, env=ENV)
    result = run_skid("compress", tmp_path / "net.pt", "--data", files / "calib.npy",
                      "--out", tmp_path / "o.pt")
    assert result.returncode == cli.EXIT_INPUT
    assert "classes must be importable" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_cuda_exits_2(files, capsys):
    argv = ["compress", str(files / "model.pt"), "--data", str(files / "calib.npy"), "--out",
            str(files / "o.pt"), "--device", "cuda"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compress_on_cuda_round_trip(files, tmp_path):
    result = run_skid("compress", files / "model.pt", "--data", files / "calib.npy", "--device",
                      "cuda", "--out", tmp_path / "gpu.pt", "--report", tmp_path / "gpu.json")
    assert result.returncode == 0, result.stderr
    small = torch.load(tmp_path / "gpu.pt", weights_only=False)
    assert next(small.parameters()).is_cuda
    for layer in json.loads((tmp_path / "gpu.json").read_text())["layers"]:
        assert out_width(module(small, layer["producer"])) == layer["width_after"]


def test_help_says_to_load_only_trusted_files():
    result = run_skid("compress", "--help")
    assert result.returncode == 0
    assert "ONLY LOAD FILES" in result.stdout and "weights_only=False" in result.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert "demo" in capsys.readouterr().err


def test_format_table_aligns_columns():
    table = cli.format_table(("a", "bb"), [("xyz", "1"), ("q", "22")], align="<>")
    assert table.splitlines() == ["a    bb", "---  --", "xyz   1", "q    22"]
