"""The package's surface: public names, lazy torch import."""

import subprocess
import sys

import pytest

import skid


def test_public_names():
    for name in skid.__all__:
        assert getattr(skid, name) is not None
    assert "NetworkCompressor" in dir(skid)


@pytest.mark.slow  # a subprocess
def test_import_skid_does_not_import_torch():
    code = "import sys, skid; skid.InterpolativeDecomposition; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute_raises_attribute_error():
    try:
        skid.not_a_name  # noqa: B018
    except AttributeError as error:
        assert "not_a_name" in str(error)
    else:
        raise AssertionError("expected AttributeError")
