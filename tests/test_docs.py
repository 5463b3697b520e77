"""The documentation: the Sphinx build (warnings are errors) and the getting-started code.

The build executes the gallery, so it takes a while; deselect it with ``-m "not docs"``. The
getting-started code is the README's quick start, which ``tests/test_readme.py`` runs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.docs
@pytest.mark.slow
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


def test_getting_started_code_is_the_readmes_quick_start():
    # one copy of the code runs (tests/test_readme.py): the same model is not trained twice
    readme = re.findall(r"```python\n(.*?)```", (DOCS.parent / "README.md").read_text(), re.S)
    blocks = python_blocks((DOCS / "getting_started.rst").read_text())
    assert [b.strip() for b in blocks] == [b.strip() for b in readme]
