"""The ``skid`` command line: in-process through ``cli.main``, end to end through subprocesses
(marked slow), and its error paths.

The compress tests use the demo CNN seeded but untrained: the command's plumbing does not need
a trained model, and nothing here asserts a held-out number.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from skid import NetworkCompressor, cli
from skid._demo import load_digits_images, make_digits_cnn
from skid.nn._calibration import calibration_passes

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "COLUMNS": "120"}


def run_skid(*args, cwd=None, timeout=300):
    """``python -m skid ARGS`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "skid", *map(str, args)],
        capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout,
    )


def exit_code(argv):
    """``cli.main(argv)``'s exit code, also when argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def digits():
    X_train, X_test, _, _ = load_digits_images()
    return X_train[:400], X_test[:200]


@pytest.fixture(scope="module")
def model():
    return make_digits_cnn().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, digits):
    """A saved whole model and calibration data in .npy form."""
    folder = tmp_path_factory.mktemp("cli")
    torch.save(model, folder / "model.pt")
    np.save(folder / "calib.npy", digits[0])
    return folder


def compress(files, *options, out="o.pt"):
    """``skid compress`` in-process on the saved model and data; returns the exit code."""
    argv = ["compress", str(files / "model.pt"), "--data", str(files / "calib.npy")]
    if "--out" not in options:
        argv += ["--out", str(files / out)]
    return exit_code([*argv, *map(str, options), "--quiet"])


def module(model, name):
    return dict(model.named_modules())[name]


def out_width(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- skid demo


@pytest.mark.slow
def test_demo_prints_one_row_per_setting_and_saves_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_skid("demo", "--plot", tmp_path / "demo.png")
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
    assert 0.0 <= float(half[5]) <= 1.0  # agreement
    assert re.fullmatch(r"\d+-\d+-\d+", half[3])  # one width per prunable layer
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_table_has_one_row_per_setting(capsys, monkeypatch, model):
    monkeypatch.setattr("skid._demo.train_digits_cnn", lambda *args, **kwargs: model)
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
    assert flops["target_flops=0.3"] <= 30.0 + 1e-9
    assert all(0.0 <= value <= 1.0 for value in agreement.values())


def test_demo_plot_without_matplotlib_fails_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr("skid._demo.train_digits_cnn", _fail_if_called)
    assert cli.main(["demo", "--plot", str(tmp_path / "x.png")]) == cli.EXIT_USAGE
    assert "pip install 'skid[plot]'" in capsys.readouterr().err


def test_demo_plot_into_a_missing_folder_fails_before_any_work(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")  # without it, the missing package is reported first
    monkeypatch.setattr("skid._demo.train_digits_cnn", _fail_if_called)
    assert cli.main(["demo", "--plot", str(tmp_path / "no" / "x.png")]) == cli.EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the demo trained a model before checking its options")


# --------------------------------------------------------------------------- skid compress


@pytest.mark.slow
def test_compress_round_trip_saved_model_matches_report(files, model, digits):
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
    expected = NetworkCompressor(tol=0.05).fit(model, torch.as_tensor(digits[0]))
    assert [layer["width_after"] for layer in expected.layers_] == [
        layer["width_after"] for layer in report["layers"]
    ]
    assert report["flops"] == {k: int(v) for k, v in expected.flops_.items()}
    assert report["n_calibration_samples"] == len(digits[0])
    X_test = torch.as_tensor(digits[1])
    with torch.no_grad():
        np.testing.assert_allclose(  # float32 GEMMs round differently across thread counts
            small(X_test).numpy(), expected.compressed_model_(X_test).numpy(), atol=2e-4
        )
    assert "FLOPs per sample" in result.stdout
    assert "calibration" in result.stderr  # the tqdm progress bar
    assert "warning" not in result.stderr  # a plain nn.Sequential loads without --trust-pickle


def test_compress_target_flops_and_exclude(files, capsys):
    excluded = "0"  # the first conv: its channels are never pruned
    code = compress(files, "--target-flops", "0.5", "--exclude", f"{excluded},", "--report",
                    files / "half.json")
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == ""  # --quiet
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


def test_compress_to_a_safetensors_folder_reloads_without_pickles(files, model, digits, capsys):
    pytest.importorskip("safetensors")
    from skid.nn import load_compressed

    out = files / "small_folder"
    assert compress(files, "--rank", "0.5", "--format", "safetensors", "--out", out) == 0, (
        capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "skid_plan.json"]
    expected = NetworkCompressor(rank=0.5).fit(model, torch.as_tensor(digits[0]))
    loaded = load_compressed(make_digits_cnn(), out)
    X_test = torch.as_tensor(digits[1])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(X_test).numpy(),
                                   expected.compressed_model_(X_test).numpy(), atol=2e-4)


def test_a_safetensors_output_that_is_a_file_or_clashes_is_refused(files, tmp_path, capsys):
    passes = calibration_passes()
    (tmp_path / "file").write_text("x")
    code = compress(files, "--format", "safetensors", "--out", tmp_path / "file")
    assert code == cli.EXIT_INPUT and "writes a folder" in capsys.readouterr().err
    code = compress(files, "--format", "safetensors", "--out", tmp_path / "dir", "--report",
                    tmp_path / "dir" / "skid_plan.json")
    assert code == cli.EXIT_USAGE
    assert "--report" in capsys.readouterr().err and calibration_passes() == passes


# --------------------------------------------------------------------------- errors


@pytest.mark.slow
def test_missing_model_file_exits_3_without_traceback(files, tmp_path):
    result = run_skid("compress", tmp_path / "nope.pt", "--data", files / "calib.npy",
                      "--out", tmp_path / "out.pt")
    assert result.returncode == cli.EXIT_INPUT
    assert "model file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_conflicting_width_options_exit_2(files, capsys):
    assert compress(files, "--tol", "0.1", "--rank", "0.5") == cli.EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_model_rejecting_the_data_exits_1(files, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((10, 3, 5, 5), dtype=np.float32))
    argv = ["compress", str(files / "model.pt"), "--data", str(tmp_path / "bad.npy"),
            "--out", str(tmp_path / "out.pt")]
    assert exit_code(argv) == cli.EXIT_FAILED
    assert "(10, 3, 5, 5)" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_nothing_prunable_exits_4(tmp_path, capsys):
    torch.save(nn.Sequential(nn.Linear(4, 3)), tmp_path / "tiny.pt")
    np.save(tmp_path / "x.npy", np.ones((8, 4), dtype=np.float32))
    argv = ["compress", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "x.npy"),
            "--out", str(tmp_path / "out.pt")]
    assert exit_code(argv) == cli.EXIT_NOT_PRUNABLE
    assert "nothing to prune" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--data", "missing.npy"], cli.EXIT_INPUT, "calibration data file not found"),
        (["--target-flops", "1.5"], cli.EXIT_USAGE, r"1.5 is not in \(0.0, 1.0\)"),
        (["--tol", "abc"], cli.EXIT_USAGE, "'abc' is not a number"),
        (["--batch-size", "0"], cli.EXIT_USAGE, "0 must be >= 1"),
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


@pytest.mark.parametrize("content", [b"not a model", np.arange(3).tobytes() * 40])
def test_a_file_that_is_no_torch_save_says_so(files, tmp_path, content, capsys):
    (tmp_path / "m.pt").write_bytes(content)
    argv = ["compress", str(tmp_path / "m.pt"), "--data", str(files / "calib.npy"), "--out",
            str(tmp_path / "o.pt")]
    assert cli.main(argv) == cli.EXIT_INPUT
    assert re.search(r"cannot load .*m\.pt", capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_cuda_exits_2(files, capsys):
    assert compress(files, "--device", "cuda") == cli.EXIT_USAGE
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


# ------------------------------------------------------------------ outputs never clobber


@pytest.fixture
def inputs(tmp_path, files):
    """Private copies of the model and the data (these tests try to overwrite them)."""
    for name in ("model.pt", "calib.npy"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    return tmp_path


def _link(kind, target, link):
    (os.link if kind == "hard" else os.symlink)(target, link)
    return link


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (lambda d: ["--out", d / "calib.npy"], "--out .* is the same file as --data"),
        (lambda d: ["--out", d / "o.pt", "--report", d / "model.pt"],
         "--report .* is the same file as the input model"),
        (lambda d: ["--out", d / "o.pt", "--report", d / "calib.npy"],
         "--report .* is the same file as --data"),
        (lambda d: ["--out", d / "o.pt", "--report", d / "o.pt"],
         "--report .* is the same file as --out"),
        (lambda d: ["--out", d / "sub" / ".." / "model.pt"], "is the same file as the input"),
        (lambda d: ["--out", _link("hard", d / "model.pt", d / "hard.pt")],
         "--out .* is the same file as the input model"),
        (lambda d: ["--out", _link("soft", d / "calib.npy", d / "soft.npy")],
         "--out .* is the same file as --data"),
        (lambda d: ["--out", d / "o.pt", "--report", _link("hard", d / "calib.npy", d / "r")],
         "--report .* is the same file as --data"),
    ],
    ids=["out=data", "report=model", "report=data", "report=out", "out=model, other spelling",
         "out hard link to model", "out symbolic link to data", "report hard link to data"],
)
def test_an_output_that_is_an_input_or_the_other_output_exits_2(inputs, outputs, message,
                                                                 capsys):
    (inputs / "sub").mkdir()
    before = {name: digest(inputs / name) for name in ("model.pt", "calib.npy")}
    argv = ["compress", str(inputs / "model.pt"), "--data", str(inputs / "calib.npy"),
            "--rank", "0.5", *map(str, outputs(inputs))]
    passes = calibration_passes()
    assert exit_code(argv) == cli.EXIT_USAGE
    assert re.search(message, capsys.readouterr().err)
    assert calibration_passes() == passes
    assert {name: digest(inputs / name) for name in before} == before
    assert not (inputs / "o.pt").exists()


@pytest.mark.parametrize("option", ["--out", "--report"])
def test_an_output_that_is_a_directory_exits_3_before_calibrating(files, tmp_path, option,
                                                                  capsys):
    passes = calibration_passes()
    paths = {"--out": tmp_path / "o.pt", "--report": tmp_path / "r.json", option: tmp_path}
    assert compress(files, *[x for item in paths.items() for x in item]) == cli.EXIT_INPUT
    assert f"{option} {tmp_path} is a directory" in capsys.readouterr().err
    assert calibration_passes() == passes


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permissions do not restrict root")
def test_an_unwritable_output_exits_3_before_calibrating(files, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "read-only.pt").write_bytes(b"")
    (tmp_path / "read-only.pt").chmod(0o444)
    locked.chmod(0o555)
    passes = calibration_passes()
    try:
        for out in (locked / "o.pt", tmp_path / "read-only.pt"):
            assert compress(files, "--out", out) == cli.EXIT_INPUT
            assert f"cannot write {out}" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)
    assert calibration_passes() == passes


def test_a_folder_refusing_new_files_exits_3_before_calibrating(files, monkeypatch, capsys):
    # what a read-only mount or a permission error looks like, also for root
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("skid._cli_files.tempfile.TemporaryFile", refuse)
    passes = calibration_passes()
    assert compress(files) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "cannot write" in err and "Permission denied" in err
    assert calibration_passes() == passes


def test_an_existing_output_is_replaced_as_a_whole(files, tmp_path, capsys):
    other = tmp_path / "other.pt"
    other.write_bytes(b"another file")
    out = _link("hard", other, tmp_path / "o.pt")  # not an input: may be replaced
    assert compress(files, "--rank", "0.5", "--out", out) == 0, capsys.readouterr().err
    assert other.read_bytes() == b"another file"  # its other name keeps the old content
    assert isinstance(torch.load(out, weights_only=False), nn.Sequential)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


# ----------------------------------------------------------------- loading code and modules


def test_a_plain_torch_nn_model_loads_without_running_pickled_code(files, tmp_path, capsys):
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(16),
        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2),
    )
    torch.save(model, tmp_path / "m.pt")
    argv = ["compress", str(tmp_path / "m.pt"), "--data", str(files / "calib.npy"), "--rank",
            "0.5", "--out", str(tmp_path / "o.pt"), "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err


class _RunsCode:
    """Unpickling this writes a file: what a malicious model file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_pickle_that_runs_code_is_refused_by_default(files, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"model": nn.Linear(2, 2), "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    argv = ["compress", str(tmp_path / "evil.pt"), "--data", str(files / "calib.npy"),
            "--out", str(tmp_path / "o.pt")]
    assert cli.main(argv) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "exec" in err and "pass --trust-pickle" in err
    assert not marker.exists()


@pytest.fixture
def custom_model_folder(tmp_path):
    """A folder holding ``skid_test_nets.py`` and ``net.pt``, a model of its class ``Net``."""
    (tmp_path / "skid_test_nets.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Sequential):\n    pass\n"
    )
    spec = importlib.util.spec_from_file_location("skid_test_nets",
                                                  tmp_path / "skid_test_nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    sys.modules["skid_test_nets"] = nets  # for pickling by reference
    try:
        model = nets.Net(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
        torch.save(model, tmp_path / "net.pt")
    finally:
        del sys.modules["skid_test_nets"]
    yield tmp_path
    sys.modules.pop("skid_test_nets", None)


def _compress_custom(folder, files, *options):
    return cli.main(["compress", str(folder / "net.pt"), "--data", str(files / "calib.npy"),
                     "--rank", "0.5", "--out", str(folder / "o.pt"), "--quiet", *options])


def test_a_model_of_custom_classes_needs_trust_pickle(custom_model_folder, files, capsys,
                                                      monkeypatch):
    monkeypatch.chdir(custom_model_folder)
    assert _compress_custom(custom_model_folder, files) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "skid_test_nets.Net" in err and "If you trust the file, pass --trust-pickle" in err
    assert "skid_test_nets" not in sys.modules


def test_trust_pickle_warns_and_finds_classes_in_the_working_directory(
    custom_model_folder, files, capsys, monkeypatch, tmp_path_factory
):
    path = list(sys.path)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert _compress_custom(custom_model_folder, files, "--trust-pickle") == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "classes must be importable" in err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--trust-pickle" in warnings[0] and "trust" in warnings[0]
    monkeypatch.chdir(custom_model_folder)
    assert _compress_custom(custom_model_folder, files, "--trust-pickle") == 0
    assert type(torch.load(custom_model_folder / "o.pt", weights_only=False)).__name__ == "Net"
    assert sys.path == path  # the working directory was searched last, and only while loading


def test_compress_never_puts_the_working_directory_on_sys_path(files, tmp_path, monkeypatch):
    path = list(sys.path)
    monkeypatch.chdir(tmp_path)
    assert compress(files, "--rank", "0.5") == 0
    assert sys.path == path


@pytest.mark.slow
def test_stdlib_named_modules_in_the_working_directory_never_run(files, tmp_path):
    marker = tmp_path / "shadowed"
    for name in ("shlex", "statistics", "colorsys", "fractions"):  # imported lazily by torch
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name} ')\n")
    result = run_skid("compress", files / "model.pt", "--data", files / "calib.npy", "--rank",
                      "0.5", "--out", tmp_path / "o.pt", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), f"modules of the working directory ran: {marker.read_text()}"


def test_help_says_how_models_are_loaded(capsys):
    assert exit_code(["compress", "--help"]) == 0
    out = capsys.readouterr().out
    assert "weights_only=True" in out and "--trust-pickle" in out
    assert "ONLY USE IT FOR FILES YOU" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert "demo" in capsys.readouterr().err


def test_format_table_aligns_columns():
    table = cli.format_table(("a", "bb"), [("xyz", "1"), ("q", "22")], align="<>")
    assert table.splitlines() == ["a    bb", "---  --", "xyz   1", "q    22"]


def test_report_is_the_table_the_cli_prints(files, model, digits, capsys):
    nc = NetworkCompressor(rank=0.5).fit(model, torch.as_tensor(digits[0]))
    table = nc.report()
    assert table.splitlines()[0].split() == ["kind", "producer", "consumer", "width", "kept",
                                             "ID", "error"]
    assert len(table.splitlines()) == 2 + len(nc.layers_) + 3  # header, rule, rows, totals
    first = nc.layers_[0]
    assert f"{first['width_before']} -> {first['width_after']}" in table
    printed = exit_code(["compress", str(files / "model.pt"), "--data",
                         str(files / "calib.npy"), "--rank", "0.5", "--out",
                         str(files / "r.pt")])
    assert printed == 0 and table in capsys.readouterr().out


def test_safetensors_format_is_checked_before_calibrating(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    passes = calibration_passes()
    code = compress(files, "--format", "safetensors", "--out", tmp_path / "out")
    assert code == cli.EXIT_INPUT and calibration_passes() == passes
    assert "pip install safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_safetensors_weights_get_the_plans_permissions(files, tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "small"
    assert compress(files, "--rank", "0.5", "--format", "safetensors", "--out", out) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["skid_plan.json"]


def test_unknown_exclude_lists_the_names_near_it(files, capsys):
    assert compress(files, "--exclude", "features.0", "--rank", "0.5") == cli.EXIT_USAGE
    message = capsys.readouterr().err
    assert "no module 'features.0'; the names nearest it" in message
    assert re.search(r"'0', '1', ", message)
