"""The README's quick-start code runs as written (in order, in one namespace)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_three_quick_starts():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "InterpolativeDecomposition" in blocks[0]
    assert "NetworkCompressor" in blocks[1]
    assert "GridSearchCV" in blocks[2] and "most_compressed" in blocks[2]


@pytest.mark.slow  # trains the quick start's MLP
def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # the examples write small.pt and a cache folder
    namespace = {}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["id_"].rank_ == 30
    assert namespace["id_"].error_ <= 0.01
    assert namespace["nc"].flops_["after"] <= 0.5 * namespace["nc"].flops_["before"] * 1.02
    search = namespace["search"]  # the refit rule; agreement itself depends on the training
    agreement = search.cv_results_["mean_test_agreement"]
    chosen = agreement[search.best_index_]
    assert chosen >= 0.99 or chosen == agreement.max()
    assert (tmp_path / "small.pt").exists()
    assert (tmp_path / "small" / "skid_plan.json").exists()
