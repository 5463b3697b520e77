"""The planner's structure: settings, objective and calibration objects, plan_, unit kinds,
objective="outputs" with calibration="corrective", the public merge of CrossAccumulator."""

import ast
import pathlib
import threading

import numpy as np
import pytest
import torch
from sklearn.base import clone

import skid
from skid._corrective import CrossAccumulator
from skid.nn import (
    ActivationsObjective,
    CorrectiveCalibration,
    NetworkCompressor,
    Objective,
    OutputsObjective,
    SequentialCalibration,
    register_objective,
)
from skid.nn._settings import FitSettings

from .models import ARCHITECTURES
from .test_blocks import X as STACK_X
from .test_blocks import assert_same_models, make_stack
from .test_corrective import deep_mlp, relative_gap


def _skid_imports() -> dict:
    """Module → skid modules it imports (anywhere in its body), from the source."""
    root = pathlib.Path(skid.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)]
            target = ".".join(base + [node.module or ""]).strip(".") if node.level else (
                node.module or "")
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        edges[name] = {t for t in found if t in modules and t != name}
    return edges


def test_no_import_circles_between_skid_modules():
    edges = _skid_imports()
    packages = {"skid", "skid.nn"}  # a package imports its modules to re-export them

    def reaches(start, goal):
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen and nxt not in packages:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    circles = sorted((a, b) for a, targets in edges.items() for b in targets
                     if a not in packages and b not in packages and reaches(b, a))
    assert circles == []


def test_settings_are_one_frozen_record_resolved_once():
    nc = NetworkCompressor(deep_mlp(), rank=0.5, calibration="corrective")
    settings = FitSettings.from_params(nc.get_params(deep=False))
    assert isinstance(settings.calibration, CorrectiveCalibration)
    assert isinstance(settings.objective, ActivationsObjective)
    assert settings.method in ("gram", "qr") and settings.tol_request is None
    with pytest.raises(AttributeError):
        settings.rank = 0.1


def test_plan_is_the_applied_plan():
    model, X = deep_mlp(), torch.randn(300, 6)
    nc = NetworkCompressor(model, rank=0.5).fit(X)
    assert len(nc.plan_) == len(nc.layers_) == 3
    assert nc.plan_.layers == nc.layers_ and nc.plan_.n_samples == 300
    assert [s.keep.numel() for s in nc.plan_.selections] == [
        r["width_after"] for r in nc.layers_]


def test_variants_are_parameters_and_survive_clone():
    model, X = deep_mlp(), torch.randn(300, 6)
    greedy = NetworkCompressor(model, rank=0.5, calibration=CorrectiveCalibration("greedy"))
    twin = clone(greedy)
    assert twin.calibration == CorrectiveCalibration("greedy")
    greedy.fit(X)
    gram = NetworkCompressor(model, rank=0.5, calibration="corrective").fit(X)
    named = NetworkCompressor(model, rank=0.5, calibration=CorrectiveCalibration()).fit(X)
    assert_same_models(gram, named, atol=0)
    assert greedy.layers_[0]["width_after"] == gram.layers_[0]["width_after"]
    pivots = NetworkCompressor(model, rank=0.5,
                               objective=OutputsObjective(pivots="greedy")).fit(X)
    assert len(pivots.layers_) == 3
    with pytest.raises(ValueError, match="pivots"):
        OutputsObjective(pivots="nope")
    with pytest.raises(ValueError, match="selection"):
        CorrectiveCalibration(selection="nope")
    with pytest.raises(skid.exceptions.InvalidParameterError, match="objective"):
        NetworkCompressor(model, objective=3).fit(X)


class _FirstChannelsFirst(Objective):
    """Keeps channels in index order (a test objective: not a good one)."""

    def factorization(self, work, unit, fac):
        return _InOrder(fac)


class _InOrder:
    def __init__(self, fac):
        self.n_features, self.n_samples = fac.n_features, fac.n_samples
        self.errors = np.linspace(1.0, 0.0, fac.n_features + 1)

    def select(self, k):
        keep = np.arange(k)
        T = np.zeros((k, self.n_features))
        T[keep, keep] = 1.0
        return keep, T


def test_a_custom_objective_is_one_object():
    model, X = deep_mlp(), torch.randn(300, 6)
    nc = NetworkCompressor(model, rank=0.5, objective=_FirstChannelsFirst()).fit(X)
    assert [s.keep.tolist() for s in nc.plan_.selections] == [
        list(range(r["width_after"])) for r in nc.layers_]
    register_objective("first-channels", _FirstChannelsFirst())
    named = NetworkCompressor(model, rank=0.5, objective="first-channels").fit(X)
    assert_same_models(nc, named, atol=0)


def test_unknown_unit_kinds_are_named():
    from skid.nn._unit_kinds import unit_kind

    class Odd:
        kind = "odd"

    with pytest.raises(ValueError, match="register_unit_kind"):
        unit_kind(Odd())


# ------------------------------------------------------------ outputs with corrective


@pytest.mark.filterwarnings("ignore:objective=.* does not apply")
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_outputs_with_corrective_is_exact_at_full_rank(name):
    factory, make_input = ARCHITECTURES[name]
    nc = NetworkCompressor(factory(), rank=1.0, objective="outputs", calibration="corrective",
                           batch_size=16)
    nc.fit(make_input(48, seed=1))
    held_out = make_input(16, seed=2)
    assert relative_gap(nc.transform(held_out), nc._original_outputs(held_out)) < 1e-5


def _consumer_input(model, name, X):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].double()))
    with torch.no_grad():
        model(X)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_outputs_with_corrective_reports_the_weighted_error_against_the_original(method):
    """The last unit (its consumer never narrowed): ``T`` fitted to the original model's
    input, the error ``‖(Z_o − Z_c[:, J] T) D‖ / ‖Z_o D‖`` with D the consumer's column norms."""
    model, X = deep_mlp(), torch.randn(400, 6)
    with torch.no_grad():
        model[6].weight.mul_(torch.logspace(-2, 0, 16))
    nc = NetworkCompressor(model, rank=0.5, objective="outputs", calibration="corrective",
                           method=method).fit(X)
    selection = nc.plan_.selections[-1]
    z_o = _consumer_input(model, "6", X)
    z_c = _consumer_input(nc.compressed_model_, "6", X)  # the kept channels, compressed
    order = torch.argsort(selection.keep)  # the narrowed layer keeps them in channel order
    fitted = z_c @ selection.interpolation.double()[order]
    d = torch.linalg.vector_norm(model[6].weight.detach().double(), dim=0)
    error = torch.linalg.norm((z_o - fitted) * d) / torch.linalg.norm(z_o * d)
    assert float(error) == pytest.approx(nc.layers_[-1]["error"], rel=1e-4, abs=1e-7)
    # T is the least-squares fit of the original's input: the residual is orthogonal to Z_c
    gap = ((z_o - fitted).T @ z_c).abs().max() / (z_o.norm() * z_c.norm())
    assert float(gap) < 1e-6
    # the pivots weigh the consumer's weights: not those of the activation objective
    plain = NetworkCompressor(model, rank=0.5, calibration="corrective", method=method).fit(X)
    assert set(plain.plan_.selections[-1].keep.tolist()) != set(selection.keep.tolist())


@pytest.mark.parametrize("params", [{"tol": 0.05}, {"rank": 0.4}, {"target_flops": 0.5}],
                         ids=["tol", "rank", "target_flops"])
@pytest.mark.parametrize("calibration", ["original", "sequential", "corrective"])
def test_outputs_blockwise_equals_one_pass(params, calibration):
    model = make_stack()
    kwargs = dict(batch_size=40, objective="outputs", calibration=calibration, **params)
    blockwise = NetworkCompressor(model, **kwargs).fit(STACK_X)
    one_pass = NetworkCompressor(model, blocks=None, **kwargs).fit(STACK_X)
    assert blockwise.blocks_ == "layers" and one_pass.blocks_ is None
    assert_same_models(blockwise, one_pass)


def test_a_calibration_object_runs_block_wise_too():
    model = make_stack()
    blockwise = NetworkCompressor(model, rank=0.5, batch_size=40,
                                  calibration=SequentialCalibration()).fit(STACK_X)
    one_pass = NetworkCompressor(model, rank=0.5, batch_size=40, blocks=None,
                                 calibration="sequential").fit(STACK_X)
    assert_same_models(blockwise, one_pass)


# ----------------------------------------------------------- CrossAccumulator.merge_over


class _ThreadGroup:
    """Collectives over threads (one per simulated process), for ``merge_over``."""

    def __init__(self, n):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), {}

    def _reduce(self, rank, value, op):
        self.slots[rank] = value
        self.barrier.wait()
        result = op([self.slots[r] for r in range(self.n)])
        self.barrier.wait()
        return result

    def collectives(self, rank):
        def all_sum(a):
            return self._reduce(rank, np.asarray(a, dtype=np.float64), lambda v: sum(v))

        def all_max(values):
            return [int(x) for x in self._reduce(rank, np.asarray(values), np.maximum.reduce)]

        def reduce_r(acc, width, exp):  # stack the R factors and refactor
            Rs = self._reduce(rank, np.asarray(acc.R) * 2.0**(acc.scale_exp - exp),
                              lambda v: v)
            acc.R = np.linalg.qr(np.vstack(Rs), mode="r") * 2.0 ** (exp - acc.scale_exp)

        return dict(all_sum=all_sum, all_max=all_max, reduce_r=reduce_r)


def test_merge_over_gives_what_one_process_accumulates(method="gram"):
    rng = np.random.default_rng(0)
    Zc = rng.standard_normal((90, 5))
    Zo = Zc + 0.1 * rng.standard_normal((90, 5))
    whole = CrossAccumulator(method).update(Zc, Zo).statistics()
    group, parts = _ThreadGroup(3), [slice(0, 40), slice(40, 90), slice(90, 90)]
    results = [None] * 3

    def run(rank):
        acc = CrossAccumulator(method)
        if parts[rank].stop > parts[rank].start:  # the last process saw no rows
            acc.update(Zc[parts[rank]], Zo[parts[rank]])
        acc.merge_over(5, **group.collectives(rank))
        results[rank] = acc.statistics()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for stats in results:
        assert stats.n_samples == 90 and not stats.unchanged
        np.testing.assert_allclose(stats.first, whole.first)
        np.testing.assert_allclose(stats.cross, whole.cross)
        np.testing.assert_allclose(stats.sq_cols, whole.sq_cols)
        assert stats.sq_norm == pytest.approx(whole.sq_norm)


def test_the_user_guides_custom_objective_runs(capsys):
    """The worked example of "Extending skid" (docs/user_guide.rst), run as written."""
    import re

    guide = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "user_guide.rst").read_text()
    section = guide[guide.index("Extending skid\n"):]
    (code,) = re.findall(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", section)[:1]
    exec("\n".join(line[3:] for line in code.splitlines()), {"__name__": "guide"})
    assert capsys.readouterr().out.split() == ["8", "16", "16"]
