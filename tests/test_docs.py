"""The documentation: the Sphinx build (warnings are errors) and the getting-started code.

The build executes the gallery, so it takes a while; deselect it with ``-m "not docs"``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.docs
def test_sphinx_build_has_no_warnings(tmp_path):
    for module in ("sphinx", "numpydoc", "sphinx_gallery", "matplotlib", "pandas"):
        pytest.importorskip(module)
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
               "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index", "user_guide", "api", "cli", "auto_examples/index",
                 "gen_modules/skid.NetworkCompressor", "gen_modules/skid.interp_decomp"):
        assert (html / f"{page}.html").is_file(), page
    gallery = (html / "auto_examples" / "plot_compress_digits_cnn.html").read_text()
    assert re.search(r"<img [^>]*sphx_glr_plot_compress_digits_cnn_001", gallery)
    assert "ONLY USE IT FOR FILES YOU" in (html / "cli.html").read_text()


def python_blocks(rst):
    """The ``.. code-block:: python`` bodies of an rst file, dedented."""
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", rst)
    return ["\n".join(line[3:] for line in block.splitlines()) for block in blocks]


def test_getting_started_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick starts write small.pt and skid_cache/
    blocks = python_blocks((DOCS / "getting_started.rst").read_text())
    assert len(blocks) == 3
    namespace = {}
    for block in blocks:  # one namespace: the grid search reuses the trained model
        exec(compile(block, "getting_started.rst", "exec"), namespace)
    assert namespace["id_"].rank_ == 30
    assert namespace["nc"].flops_["after"] <= 0.5 * namespace["nc"].flops_["before"] * 1.0001
    assert (tmp_path / "small.pt").is_file()
    assert namespace["search"].best_params_["tol"] in (0.2, 0.1, 0.05, 0.02, 0.01)
