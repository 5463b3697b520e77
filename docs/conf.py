"""Sphinx configuration: numpydoc docstrings, autosummary API pages, a sphinx-gallery gallery.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import re
import sys
from pathlib import Path

import skid

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for _cli_help

project = "skid"
author = "the skid developers"
copyright = "the skid developers"  # noqa: A001 - Sphinx's name
version = release = skid.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "gen_modules/backreferences", "**.ipynb_checkpoints"]
root_doc = "index"
default_role = "literal"

# autosummary writes one page per public object from its numpydoc docstring.
autosummary_generate = True
autodoc_default_options = {
    "members": True,
    "inherited-members": True,
    # scikit-learn's own docstrings for these point at labels of scikit-learn's site
    "exclude-members": "get_metadata_routing, set_output",
}
autodoc_typehints = "none"  # the numpydoc Parameters sections carry the types
numpydoc_show_class_members = False  # the class template lists the members instead
numpydoc_class_members_toctree = False

# The gallery: every examples/plot_*.py is executed at build time; its printed output and its
# figures are embedded under the code, so what the docs show is what the code does today.
sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("skid",),
    "backreferences_dir": "gen_modules/backreferences",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "min_reported_time": 1,
    "write_computation_times": False,
}

html_theme = "alabaster"
html_title = f"skid {release}"
html_static_path = []
html_theme_options = {
    "description": "The interpolative decomposition, and compression of trained torch "
    "networks without fine-tuning",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}


_SHAPE = re.compile(r"of shape \(([^)]*)\)")
_NAME_WITH_UNDERSCORE = re.compile(r"(?<![`\w])([A-Za-z]\w*_)(?![`\w])")


def _quote_fitted_names_in_shapes(app, what, name, obj, options, lines):
    """``of shape (rank_,)`` -> ``of shape (`rank_`,)``: a trailing ``_`` is rST link syntax.

    scikit-learn's docstrings write fitted attributes inside shapes in backticks; this lets
    ours write them bare, as numpydoc readers expect, without breaking the build.
    """
    for i, line in enumerate(lines):
        lines[i] = _SHAPE.sub(
            lambda m: "of shape (" + _NAME_WITH_UNDERSCORE.sub(r"`\1`", m.group(1)) + ")", line
        )


def _write_cli_help(app):
    """Write ``skid COMMAND --help`` into files that cli.rst includes, so they never drift."""
    from _cli_help import write_cli_help

    write_cli_help(HERE / "gen_modules" / "cli")


def setup(app):
    app.connect("autodoc-process-docstring", _quote_fitted_names_in_shapes, priority=400)
    app.connect("builder-inited", _write_cli_help)
