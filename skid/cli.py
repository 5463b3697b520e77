"""The ``skid`` command line: ``skid demo`` and ``skid compress``.

A thin argparse layer over the public API (:class:`skid.NetworkCompressor`); no compression
logic lives here. Errors a user can fix are printed as one line on stderr, without a
traceback, and end the process with one of the exit codes below.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ._report import format_table, format_units_report, plain_layer

EXIT_OK = 0
EXIT_FAILED = 1  # the compression itself failed (e.g. the model rejects the data)
EXIT_USAGE = 2  # bad or conflicting options, an output that is an input (argparse uses 2 too)
EXIT_INPUT = 3  # a file is missing, unreadable, unwritable, or not what was expected
EXIT_NOT_PRUNABLE = 4  # the model has nothing that can be pruned

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  the compression failed (for example the model rejects the calibration data)
  2  bad or conflicting options, or an output that would overwrite an input
  3  a file is missing, unreadable, not a model / an array, or an output is unwritable
  4  the model has nothing prunable (the message lists every candidate and why)
"""


class CommandError(Exception):
    """A problem the user can fix: printed as one line on stderr, then exit with ``code``."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- argument types


def _fraction(low, high, *, low_closed, high_closed):
    """An argparse type: a float in the interval from ``low`` to ``high``."""
    lb, rb = "[" if low_closed else "(", "]" if high_closed else ")"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value >= low if low_closed else value > low
        below = value <= high if high_closed else value < high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text} is not in {lb}{low}, {high}{rb}")
        return value

    return parse


def _positive_int(text):
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


_tol_type = _fraction(0.0, 1.0, low_closed=True, high_closed=False)
_rank_type = _fraction(0.0, 1.0, low_closed=False, high_closed=True)
_target_flops_type = _fraction(0.0, 1.0, low_closed=False, high_closed=False)


# --------------------------------------------------------------------------- the parser


def build_parser():
    """The ``skid`` argument parser with its ``demo`` and ``compress`` subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="skid",
        description="Interpolative decomposition and model-preserving compression of "
        "trained PyTorch networks, without fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"skid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(commands)
    _add_compress_parser(commands)
    return parser


def _add_demo_parser(commands):
    """``skid demo``: train the digits CNN, compress it at several settings, print a table."""
    demo = commands.add_parser(
        "demo",
        help="train a small CNN on the bundled digits data and compress it",
        description="Train a small CNN on scikit-learn's bundled digits images (offline, a "
        "few seconds, fixed seed), compress it with the interpolative decomposition at "
        "several tolerances (default: 0.3 to 0.01) and FLOP budgets (default: 50% and 25% "
        "of the FLOPs), and print one table: FLOPs and "
        "parameters kept, per-layer widths, test accuracy, top-1 agreement with the "
        "original model, and the time each compression took.",
    )
    demo.add_argument(
        "--tol", type=_tol_type, action="append", metavar="TOL",
        help="per-layer relative ID error to try (repeatable; default: 0.3 0.2 0.1 0.05 0.02 "
        "0.01)",
    )
    demo.add_argument(
        "--target-flops", type=_target_flops_type, action="append", metavar="FRACTION",
        help="fraction of the FLOPs to keep (repeatable; default: 0.5 0.25)",
    )
    demo.add_argument(
        "--plot", type=Path, metavar="PATH",
        help="also save an accuracy/agreement-vs-FLOPs figure there (needs matplotlib: "
        "pip install 'skid[plot]')",
    )
    demo.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    demo.add_argument(
        "--threads", type=_positive_int, metavar="N",
        help="torch CPU threads (default: torch's own choice)",
    )
    demo.set_defaults(run=run_demo)


def _add_compress_parser(commands):
    """``skid compress``: compress a saved model with calibration data from a file."""
    compress = commands.add_parser(
        "compress",
        help="compress a saved PyTorch model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress a saved PyTorch model with the interpolative decomposition: "
        "run the unlabeled calibration\ninputs through it, keep the channels that "
        "reconstruct each layer's output best, fold the\ncorrection into the next layer, "
        "and save the narrower model (no fine-tuning).\n\n"
        "MODEL is a whole model saved with torch.save(model, MODEL). It is loaded with\n"
        "torch.load(MODEL, weights_only=True), which runs no code from the file and accepts\n"
        "models built from torch.nn classes (nn.Sequential of Linear, Conv2d, BatchNorm2d,\n"
        "activations, ...). A model of your own classes needs --trust-pickle, which unpickles\n"
        "it with weights_only=False: that can run arbitrary code, so ONLY USE IT FOR FILES YOU\n"
        "TRUST. Its classes must then be importable (an installed package, or a module in the\n"
        "current directory, which is searched after the standard library and packages).\n"
        "TorchScript and torch.export archives are not supported: their code cannot be\n"
        "rewritten layer by layer.\n\n"
        "No output may be an input or the other output (also through links), and --out and\n"
        "--report must be writable files: both are checked before any work.",
        epilog=EXIT_CODES_HELP,
    )
    compress.add_argument("model", type=Path, metavar="MODEL", help="the model file (.pt)")
    compress.add_argument(
        "--data", type=Path, required=True, metavar="CALIB",
        help="unlabeled calibration inputs, one row per sample: .npy, .npz (see --data-key) "
        "or .pt holding a tensor; floats are cast to the model's dtype",
    )
    compress.add_argument(
        "--data-key", metavar="KEY", help="the array to use from a .npz holding several"
    )
    compress.add_argument(
        "--out", type=Path, required=True, metavar="SMALL",
        help="where to save the compressed model: a file (torch.save of the whole model) or, "
        "with --format safetensors, a folder",
    )
    compress.add_argument(
        "--format", choices=("pt", "safetensors"), default="pt",
        help="pt: torch.save of the whole model (loading it unpickles classes); safetensors: "
        "a folder with the weights (model.safetensors) and the kept widths (skid_plan.json), "
        "loaded without pickles by skid.nn.load_compressed(fresh_model, folder) "
        "(default: pt)",
    )
    width = compress.add_mutually_exclusive_group()
    width.add_argument(
        "--tol", type=_tol_type, metavar="TOL",
        help="per-layer relative ID error in [0, 1) (the default, 0.01)",
    )
    width.add_argument(
        "--rank", type=_rank_type, metavar="FRACTION",
        help="keep this fraction, in (0, 1], of every layer's channels",
    )
    width.add_argument(
        "--target-flops", type=_target_flops_type, metavar="FRACTION",
        help="keep this fraction, in (0, 1), of the model's FLOPs",
    )
    compress.add_argument(
        "--exclude", action="append", default=[], metavar="NAME[,NAME...]",
        help="modules never to prune, by name as in model.named_modules() "
        "(repeatable or comma-separated)",
    )
    compress.add_argument(
        "--calibration", choices=("original", "sequential", "corrective"),
        default="original",
        help="statistics from the original model in one pass, recomputed from the model "
        "compressed so far, or corrective: each fold fitted to the original model's "
        "activations from the compressed model's (default: original)",
    )
    compress.add_argument(
        "--batch-size", type=_positive_int, default=256, metavar="N",
        help="calibration batch size (default: 256)",
    )
    compress.add_argument(
        "--device", metavar="DEVICE",
        help="torch device to load the model on and calibrate with, e.g. cuda (default: cpu)",
    )
    compress.add_argument(
        "--trust-pickle", action="store_true",
        help="load MODEL as a full pickle (torch.load with weights_only=False), for models of "
        "your own classes: it can run any code in the file, so only for files you trust",
    )
    compress.add_argument(
        "--report", type=Path, metavar="PATH", help="also write the report as JSON there"
    )
    compress.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar and no report on stdout"
    )
    compress.add_argument(
        "--traceback", action="store_true", help="show the full traceback of a failure"
    )
    compress.set_defaults(run=run_compress)


def main(argv=None):
    """Run the ``skid`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns
    -------
    exit_code : int
        0 on success; see ``skid compress --help`` for the others.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except CommandError as error:
        if getattr(args, "traceback", False):
            raise
        print(f"skid {args.command}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"skid {args.command}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- skid demo

DEMO_TOLS = (0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
DEMO_TARGET_FLOPS = (0.5, 0.25)


def run_demo(args):
    """Train the digits CNN, compress it at every setting, print the table (and plot)."""
    import torch

    from . import _demo

    if args.plot is not None:
        _require_matplotlib()
        if not args.plot.resolve().parent.is_dir():
            raise CommandError(f"the folder of {args.plot} does not exist", EXIT_INPUT)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    X_train, X_test, y_train, y_test = _demo.load_digits_images(random_state=args.seed)
    start = time.perf_counter()
    model = _demo.train_digits_cnn(X_train, y_train, seed=args.seed)
    train_seconds = time.perf_counter() - start
    reference = _demo.predict_labels(model, X_test)
    settings = [{"tol": t} for t in (args.tol or DEMO_TOLS)]
    settings += [{"target_flops": f} for f in (args.target_flops or DEMO_TARGET_FLOPS)]
    results = [
        _demo.compress_and_score(model, X_train, X_test, y_test, reference, **setting)
        for setting in settings
    ]
    original = {
        "setting": "original", "flops_kept": 1.0, "params_kept": 1.0,
        "accuracy": float((reference == y_test).mean()), "agreement": 1.0,
        "seconds": train_seconds, "layers": results[0]["layers"],
        "widths": {layer["producer"]: layer["width_before"] for layer in results[0]["layers"]},
    }
    print(_demo_header(model, X_train, X_test, original))
    print(format_demo_table([original, *results]))
    if args.plot is not None:
        try:
            _demo.plot_results([original, *results], args.plot)
        except OSError as error:
            raise CommandError(f"cannot write {args.plot}: {error}", EXIT_INPUT) from None
        print(f"\nfigure saved to {args.plot}")
    return EXIT_OK


def _demo_header(model, X_train, X_test, original):
    """The lines above the demo table: what was trained, on what, and how well."""
    n_params = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    producers = ", ".join(
        f"{layer['producer']} ({type(modules[layer['producer']]).__name__})"
        for layer in original["layers"]
    )
    return (
        f"digits CNN: {n_params:,} parameters, trained in {original['seconds']:.1f} s on "
        f"{len(X_train)} images; test accuracy {original['accuracy']:.3f} on {len(X_test)} "
        f"held-out images.\n"
        f"Compressed with the interpolative decomposition, calibrated on the training images "
        f"(no labels), no fine-tuning.\n"
        f"  widths     output channels of the prunable layers {producers}\n"
        f"  agreement  top-1 agreement with the original model on the held-out images\n"
        f"  time       seconds to train (original) or to compress\n"
    )


def format_demo_table(rows):
    """The demo results as an aligned text table, one row per setting.

    Parameters
    ----------
    rows : list of dict
        Keys ``setting``, ``flops_kept``, ``params_kept``, ``widths`` (producer → width),
        ``accuracy``, ``agreement``, ``seconds``; the first row gives the producer order.

    Returns
    -------
    table : str
    """
    producers = list(rows[0]["widths"])
    header = ("setting", "FLOPs kept", "params kept", "widths", "accuracy", "agreement",
              "time (s)")
    body = [
        (
            row["setting"],
            f"{row['flops_kept']:.1%}",
            f"{row['params_kept']:.1%}",
            "-".join(str(row["widths"].get(p, rows[0]["widths"][p])) for p in producers),
            f"{row['accuracy']:.3f}",
            f"{row['agreement']:.3f}",
            f"{row['seconds']:.2f}",
        )
        for row in rows
    ]
    return format_table(header, body, align="<>><>>>")


def _require_matplotlib():
    """Fail early, before any work, when ``--plot`` is asked for without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError(
            "--plot needs matplotlib, which is not installed: pip install 'skid[plot]'",
            EXIT_USAGE,
        ) from None


# --------------------------------------------------------------------------- skid compress


def run_compress(args):
    """Load the model and the data, compress, save, report."""
    from . import _cli_files

    try:
        _compress(args)
    except _cli_files.InputFileError as error:
        raise CommandError(str(error), EXIT_INPUT) from None
    return EXIT_OK


def _compress(args):
    """The steps of ``skid compress``."""
    from . import _cli_files as files

    _check_paths(args)
    device = _parse_device(args.device)
    if args.trust_pickle:
        print(
            f"skid compress: warning: --trust-pickle: unpickling {args.model} with "
            "weights_only=False runs any code it holds; use it only for files you trust",
            file=sys.stderr,
        )
    model = files.load_model(args.model, device, trust_pickle=args.trust_pickle)
    inputs = files.load_calibration(args.data, args.data_key, model, device)
    compressor = _make_compressor(args, device)
    _fit(compressor, model, inputs, args)
    if args.format == "safetensors":
        files.save_folder(compressor, args.out)
    else:
        files.save_model(compressor.compressed_model_, args.out)
    report = compression_report(compressor, args)
    if not args.quiet:
        print(format_compress_report(report))
    if args.report is not None:
        files.write_json(report, args.report)


def _check_paths(args):
    """Before any work: the inputs exist, no output is an input or the other output (exit 2),
    and every output can be written (exit 3)."""
    from . import _cli_files as files

    files.check_exists(args.model, "model")
    files.check_exists(args.data, "calibration data")
    inputs = {"the input model": args.model, "--data": args.data}
    outputs = {"--out": args.out, "--report": args.report}
    outputs = {option: path for option, path in outputs.items() if path is not None}
    writable = list(outputs.items())
    if args.format == "safetensors":  # --out is a folder: compare and check the files in it
        from .nn._io import PLAN_FILE, WEIGHTS_FILE

        files.check_can_write_format(args.format)
        files.check_folder_writable(args.out, "--out")
        folder_files = {"--out": args.out / WEIGHTS_FILE, "--out (plan)": args.out / PLAN_FILE}
        # an existing folder is checked file by file, a new one as a new entry of its parent
        writable = [(o, p) for o, p in writable if o != "--out"]
        writable += list(folder_files.items()) if args.out.is_dir() else [("--out", args.out)]
        outputs = {**folder_files, **{o: p for o, p in outputs.items() if o != "--out"}}
    for i, (option, path) in enumerate(outputs.items()):
        others = {**inputs, **dict(list(outputs.items())[:i])}
        for other, other_path in others.items():
            if files.same_file(path, other_path):
                raise CommandError(
                    f"{option} {path} is the same file as {other} ({other_path}); writing "
                    "it would destroy that file: choose another path", EXIT_USAGE,
                )
    for option, path in writable:
        files.check_writable(path, option)


def _parse_device(name):
    """``--device`` as a torch.device (CPU by default); exit 2 if unknown or unavailable."""
    import torch

    try:
        device = torch.device(name or "cpu")
    except RuntimeError as error:
        raise CommandError(f"--device {name}: {error}", EXIT_USAGE) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available here", EXIT_USAGE)
    return device


def _make_compressor(args, device):
    """A NetworkCompressor with the command line's settings."""
    from . import NetworkCompressor

    width = {"tol": args.tol, "rank": args.rank, "target_flops": args.target_flops}
    width = {name: value for name, value in width.items() if value is not None}
    exclude = tuple(
        name.strip() for item in args.exclude for name in item.split(",") if name.strip()
    )
    return NetworkCompressor(
        **width, exclude=exclude, calibration=args.calibration, batch_size=args.batch_size,
        device=device, verbose=not args.quiet,
    )


def _fit(compressor, model, inputs, args):
    """Fit, turning the errors a user can act on into one-line messages with exit codes."""
    from .exceptions import InvalidParameterError, NotPrunableError

    try:
        compressor.fit(model, inputs)
    except NotPrunableError as error:
        _reraise_if(args, CommandError(f"nothing to prune: {error}", EXIT_NOT_PRUNABLE))
    except InvalidParameterError as error:
        _reraise_if(args, CommandError(str(error), EXIT_USAGE))
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        data = f"{args.data}: shape {tuple(inputs.shape)}, {inputs.dtype}"
        _reraise_if(args, CommandError(f"compression failed: {error} ({data})", EXIT_FAILED))


def _reraise_if(args, error):
    """Raise ``error`` in place of the current exception (chained under ``--traceback``)."""
    if args.traceback:
        raise error
    raise error from None


def compression_report(compressor, args):
    """What was done, as plain JSON-ready data: settings, per-layer widths, FLOPs, params."""
    settings = {
        "model": str(args.model), "data": str(args.data), "out": str(args.out),
        "format": args.format, "tol": args.tol, "rank": args.rank,
        "target_flops": args.target_flops, "calibration": args.calibration,
    }
    return {
        "settings": settings,
        "n_calibration_samples": int(compressor.n_calibration_samples_),
        "flops": {k: int(v) for k, v in compressor.flops_.items()},
        "params": {k: int(v) for k, v in compressor.params_.items()},
        "layers": [plain_layer(layer) for layer in compressor.layers_],
    }


def format_compress_report(report):
    """The report of ``skid compress`` as text: ``NetworkCompressor.report()``'s table, then
    where the model went."""
    return "\n".join([
        format_units_report(report["layers"], report["flops"], report["params"]),
        f"calibrated on {report['n_calibration_samples']:,} samples; "
        f"saved to {report['settings']['out']}",
    ])
