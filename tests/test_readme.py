"""The README's quick-start code runs as written, each block on its own (a fresh namespace)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def run_block(index, folder, monkeypatch):
    """Block ``index`` alone, in ``folder``; returns its namespace."""
    monkeypatch.chdir(folder)  # the examples write small.pt, folders and a cache
    namespace = {}
    exec(compile(python_blocks()[index], str(README), "exec"), namespace)
    return namespace


def test_readme_has_the_four_quick_starts():
    blocks = python_blocks()
    assert len(blocks) == 4
    assert "InterpolativeDecomposition" in blocks[0]
    assert "NetworkCompressor" in blocks[1]
    assert "GridSearchCV" in blocks[2] and "most_compressed" in blocks[2]
    assert "LlamaForCausalLM" in blocks[3] and "perplexity" in blocks[3]
    assert len([line for line in blocks[3].splitlines() if line.strip()]) <= 15


def test_readme_id_quick_start_runs(tmp_path, monkeypatch):
    namespace = run_block(0, tmp_path, monkeypatch)
    assert namespace["id_"].rank_ == 30
    assert namespace["id_"].error_ <= 0.01


@pytest.mark.slow  # trains the quick start's MLP
def test_readme_network_quick_start_runs(tmp_path, monkeypatch):
    namespace = run_block(1, tmp_path, monkeypatch)
    assert namespace["nc"].flops_["after"] <= 0.5 * namespace["nc"].flops_["before"] * 1.02
    assert (tmp_path / "small.pt").exists()
    assert (tmp_path / "small" / "skid_plan.json").exists()


@pytest.mark.slow  # trains an MLP, then a grid search
def test_readme_grid_search_quick_start_runs_on_its_own(tmp_path, monkeypatch):
    namespace = run_block(2, tmp_path, monkeypatch)
    search = namespace["search"]  # the refit rule; agreement itself depends on the training
    agreement = search.cv_results_["mean_test_agreement"]
    chosen = agreement[search.best_index_]
    assert chosen >= 0.99 or chosen == agreement.max()
    assert (tmp_path / "skid_cache").is_dir()  # what the text says it leaves behind


@pytest.mark.slow  # a tiny LLaMA
def test_readme_language_model_quick_start_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import torch

    namespace = run_block(3, tmp_path, monkeypatch)
    nc, small, test = namespace["nc"], namespace["small"], namespace["test"]
    assert nc.flops_["after"] <= 0.5 * nc.flops_["before"] * 1.02
    with torch.no_grad():
        torch.testing.assert_close(small(**test).logits, nc.compressed_model_(**test).logits)
