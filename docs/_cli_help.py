"""Render ``skid --help`` and every subcommand's help to text files for the docs."""

import contextlib
import io
import os

from skid.cli import build_parser


def write_cli_help(folder):
    """Write ``skid.txt``, ``demo.txt``, ``compress.txt`` (help at 88 columns) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal width
    for name, argv in (("skid", ["--help"]), ("demo", ["demo", "--help"]),
                       ("compress", ["compress", "--help"])):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
        (folder / f"{name}.txt").write_text(text.getvalue())
