"""NetworkCompressor: model-preserving compression of a torch model (orchestration only).

``fit`` reads as a list of steps: walk the graph on a couple of samples → calibrate every unit
in one streamed pass → widths from the error curves → selections (the plan) → apply them by
name to one deep copy. The work is done by ``_graph``, ``_calibration``, ``_budget``,
``_surgery`` and ``_flops``.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .. import metrics
from .._linalg import FLOAT32_GRAM_RELIABLE_ERROR, GRAM_RELIABLE_ERROR
from .._validation import Interval, Options, check_params
from ..exceptions import NotPrunableError
from . import _budget, _distributed
from ._blocks import blockwise_plan, find_blocks
from ._calibration import (
    Batches,
    StatisticsCache,
    calibration_passes,
    example_inputs,
    fingerprint,
    model_device_dtype,
    model_fingerprint,
    run_model,
    to_inputs,
)
from ._flops import count_flops, count_params
from ._graph import find_units
from ._plan import Selection
from ._surgery import apply_selection

__all__ = ["NetworkCompressor"]


class NetworkCompressor(TransformerMixin, BaseEstimator):
    """Compress a trained torch model with the interpolative decomposition, without fine-tuning.

    Unlabeled calibration inputs are run through the model. For every *unit* — a ``Linear`` or
    ``Conv`` layer whose output channels reach exactly one following ``Linear``/``Conv`` only
    through per-channel operations — the activations ``Z`` as the following layer consumes them
    (rows: samples, and spatial positions for convolutions; columns: channels) get a column ID
    ``Z ≈ Z[:, J] T``. The producer keeps channels ``J`` (and so does every per-channel op in
    between) and ``T`` is folded into the consumer, so the consumer sees ``Z[:, J] T ≈ Z``.

    Parameters
    ----------
    model : torch.nn.Module, default=None
        The trained model; never modified. May instead be given to ``fit(model, X)``.
    tol : float in [0, 1), default=1e-2
        Relative ID error ``‖Z − Z[:, J] T‖_F / ‖Z‖_F`` allowed in every unit: each keeps the
        fewest channels that meet it (a different width per unit).
    rank : float in (0, 1], default=None
        Keep ``ceil(rank * width)`` channels of every unit instead of using ``tol``.
    target_flops : float in (0, 1), default=None
        Keep this fraction of the model's FLOPs instead of using ``tol``; widths are chosen
        greedily by the increase of the squared relative ID error per FLOP saved. That
        allocation and a uniform cut at the same FLOPs are both tried on the first calibration
        batch, and the one whose outputs stay closer to the model's is kept, so it never does
        worse there than keeping the same fraction of every unit.
    layers : "auto" or list of str or (str, str), default="auto"
        Restrict pruning to these producers (qualified names as in ``model.named_modules()``)
        or ``(producer, consumer)`` pairs.
    exclude : list of str, default=()
        Modules never to prune (with everything inside them).
    calibration : {"original", "sequential"}, default="original"
        ``"original"``: every unit's ID from the original model's activations, one pass.
        ``"sequential"``: units in forward order, each from the model compressed so far (one
        pass per unit; with ``target_flops`` the widths come from a first, original pass).
    blocks : "auto", str or None, default="auto"
        Block-wise calibration. ``"auto"`` finds the longest ``nn.ModuleList`` whose members
        run one after another on the previous one's output (HF decoder/encoder layers); a
        qualified name picks that list (an error if it does not qualify); None turns it off.
        The blocks are then calibrated one at a time: the inputs of the next block are cached
        on the host for every calibration batch, only the current block's statistics are held,
        and with ``device`` set only the current block (and the code around the blocks) is
        moved there, so a model larger than the device can be compressed. ``"original"`` gives
        the one-pass result. Each block costs a pass for its statistics (one per unit, up to
        that unit, with ``"sequential"``) and one that records its outputs. ``"auto"`` falls
        back to one pass when no list qualifies (``blocks_`` is None).
    method : {"auto", "gram", "qr"}, default="auto"
        Statistic streamed per unit: ``"gram"`` (``ZᵀZ`` summed in float64, then pivoted
        Cholesky: the fastest, errors resolved down to about 1e-4; float32 activations are
        multiplied in float32 unless ``tol < 1e-3``), ``"qr"`` (TSQR factor: accurate to the
        data's rounding, 2-4× the work). ``"auto"`` uses ``"qr"`` only for ``tol`` below
        1e-4.
    batch_size : int, default=256
        Rows per batch when ``X`` is a tensor or an array.
    device : str or torch.device, default=None
        Where calibration runs (default: the model's device). The compressed model is returned
        on the model's own device.
    process_group : "auto", None or torch.distributed.ProcessGroup, default="auto"
        Data-parallel calibration. ``"auto"``: when ``torch.distributed`` is initialised with
        more than one rank, each rank calibrates on its own shard of ``X`` and every statistic
        (Gram matrices or R factors, sample counts) is combined over the ranks, so all ranks
        end with the same widths, selections and compressed model — the one a single process
        would fit on all the shards (the batch decisions are tried on is the first batch of the
        lowest rank with data). Every rank must call ``fit`` with the same settings; a rank
        may have an empty shard. ``None`` ignores the group; a ``ProcessGroup`` picks one.
    memory : str, path-like or joblib.Memory, default=None
        Cache of the calibration statistics, keyed on the model's weights, the data and the
        settings: refits with another ``tol``/``rank``/``target_flops`` skip the forward passes.
        A one-shot iterator of batches is read into memory when this is set.
    verbose : bool, default=False
        Show a progress bar over the calibration batches and list the skipped layers.

    Attributes
    ----------
    compressed_model_ : torch.nn.Module
        The compressed copy (same classes, narrower), in eval mode, on the model's device and
        dtype.
    layers_ : list of dict
        One per pruned unit: ``producer``, ``consumer`` (qualified names), ``width_before``,
        ``width_after``, ``error`` (relative ID error). ``pandas.DataFrame(layers_)`` is the
        report.
    skipped_ : list of dict
        ``producer`` and ``reason`` for every Linear/Conv layer left alone.
    flops_ : dict
        ``{"before": int, "after": int}``, FLOPs per sample (2 per multiply-add).
    params_ : dict
        ``{"before": int, "after": int}``, number of parameters.
    n_calibration_samples_ : int
        Calibration samples seen.
    n_calibration_passes_ : int
        Batches run through the model for the statistics in this ``fit`` (0 when every
        statistic came from ``memory``).
    method_ : str
        ``"gram"`` or ``"qr"``, what ``method="auto"`` resolved to.
    blocks_ : str or None
        The ``ModuleList`` calibrated block by block, or None (one pass).

    See Also
    --------
    skid.InterpolativeDecomposition : the ID of a plain data matrix.
    skid.model_selection.most_compressed : pick the smallest model in a grid search.

    Notes
    -----
    Statistics stream batch by batch: memory depends on the widths, never on the number of
    calibration samples. Rows at padding positions (``attention_mask == 0`` in a dict batch)
    are left out of (batch, sequence, channels) inputs.

    References
    ----------
    Chee, J., Flynn, M., Damle, A., De Sa, C. "Model Preserving Compression for Neural
    Networks", NeurIPS 2022.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skid import NetworkCompressor
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> X = torch.randn(200, 8)
    >>> nc = NetworkCompressor(model, rank=0.25).fit(X)
    >>> nc.layers_[0]["width_before"], nc.layers_[0]["width_after"]
    (32, 8)
    >>> nc.compressed_model_[0]
    Linear(in_features=8, out_features=8, bias=True)
    """

    _parameter_constraints = {
        "model": [None, nn.Module],
        "tol": [Interval(numbers.Real, 0, 1, "left")],
        "rank": [None, Interval(numbers.Real, 0, 1, "right")],
        "target_flops": [None, Interval(numbers.Real, 0, 1, "neither")],
        "layers": [Options(("auto",)), list, tuple],
        "exclude": [list, tuple, set, frozenset, str],
        "calibration": [Options(("original", "sequential"))],
        "blocks": [None, str],
        "method": [Options(("auto", "gram", "qr"))],
        "batch_size": [Interval(numbers.Integral, 1, None)],
        "device": [None, str, torch.device],
        "process_group": [None, Options(("auto",)), _distributed.ProcessGroup],
        "memory": [None, str, os.PathLike, joblib.Memory],
        "verbose": [bool, Interval(numbers.Integral, 0, None)],
    }

    def __init__(
        self,
        model=None,
        *,
        tol=1e-2,
        rank=None,
        target_flops=None,
        layers="auto",
        exclude=(),
        calibration="original",
        blocks="auto",
        method="auto",
        batch_size=256,
        device=None,
        process_group="auto",
        memory=None,
        verbose=False,
    ):
        self.model = model
        self.tol = tol
        self.rank = rank
        self.target_flops = target_flops
        self.layers = layers
        self.exclude = exclude
        self.calibration = calibration
        self.blocks = blocks
        self.method = method
        self.batch_size = batch_size
        self.device = device
        self.process_group = process_group
        self.memory = memory
        self.verbose = verbose

    # ------------------------------------------------------------------------------ fit

    def fit(self, *args, **kwargs):
        """Calibrate on ``X`` and build ``compressed_model_``.

        Called as ``fit(model, X)`` or, with ``model`` given to the constructor,
        ``fit(X, y=None)`` (the form ``GridSearchCV`` uses).

        Parameters
        ----------
        model : torch.nn.Module, optional
            The model to compress (first positional argument); overrides the ``model``
            parameter for this fit.
        X : tensor, ndarray, dict of those, or iterable of batches
            Unlabeled calibration inputs. A tensor or array (n_samples, ...) is cut into
            ``batch_size`` batches. A batch that is a tensor/array is passed as
            ``model(batch)``, a dict as ``model(**batch)``, a tuple/list as
            ``model(batch[0])``.
        y : ignored

        Returns
        -------
        self : NetworkCompressor
        """
        model, X = self._fit_arguments(args, kwargs)
        self._check_params()
        with _distributed.active(_distributed.resolve(self.process_group)):
            return self._fit(model, X)

    def _fit(self, model, X):
        """``fit`` once the arguments are checked (within the data-parallel group, if any)."""
        home, dtype = model_device_dtype(model)
        device = home if self.device is None else torch.device(self.device)
        multi_pass = self.memory is not None or self.calibration == "sequential"
        sharded = _distributed.current() is not None
        batches = Batches(X, self.batch_size, reusable=multi_pass, allow_empty=sharded)
        batches.first = _distributed.first_batch(batches.first)  # the same on every rank
        # Block-wise, the model waits on its own device and each block moves for its turn.
        stage = home if self.blocks is not None else device
        work = _working_copy(model, stage)
        example = example_inputs(batches.first, stage, dtype)
        units = self._find_units(work, example)
        example = self._find_blocks(work, units, batches, (stage, device, dtype), example)
        self.method_ = self._resolve_method()
        self._gram_precision = self._resolve_precision()
        flops_before, module_flops = count_flops(work, *example)
        params_before = count_params(work)
        passes_before = calibration_passes()
        key = self._cache_key(model, batches, units) if self.memory is not None else None
        plan = self._plan(work, units, batches, key, (module_flops, flops_before))
        self.n_calibration_passes_ = calibration_passes() - passes_before
        self.flops_ = {"before": int(flops_before), "after": int(count_flops(work, *example)[0])}
        self.params_ = {"before": int(params_before), "after": int(count_params(work))}
        self.layers_ = [_layer_report(s) for s in plan]
        self.compressed_model_ = work.to(home).eval()
        self._original_model = model
        return self

    def _fit_arguments(self, args, kwargs):
        """``(model, X)`` from ``fit(model, X[, y])``, ``fit(X[, y])`` or keywords."""
        args = list(args)
        model = args.pop(0) if args and isinstance(args[0], nn.Module) else None
        model = kwargs.pop("model", None) if model is None else model
        X = args.pop(0) if args else kwargs.pop("X", None)
        if args:
            args.pop(0)  # y, ignored
        kwargs.pop("y", None)
        if args or kwargs:
            raise TypeError(
                "fit takes (model, X[, y]) or (X[, y]); got unexpected arguments "
                f"{[type(a).__name__ for a in args] + sorted(kwargs)}."
            )
        model = self.model if model is None else model
        if model is None:
            raise ValueError(
                "No model to compress: pass it to the constructor, NetworkCompressor(model), "
                "or to fit(model, X)."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if X is None:
            raise ValueError("fit needs calibration data X: fit(model, X) or fit(X).")
        return model, X

    def _check_params(self) -> None:
        """Check the parameters; ``rank`` and ``target_flops`` exclude each other."""
        check_params(self.get_params(deep=False), self._parameter_constraints, type(self).__name__)
        if self.rank is not None and self.target_flops is not None:
            raise ValueError(
                f"Give rank or target_flops, not both (got rank={self.rank!r}, "
                f"target_flops={self.target_flops!r}); either replaces tol."
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device={self.device!r} is not a torch device: {exc}") from exc

    def _resolve_method(self) -> str:
        """``"qr"`` for tolerances the Gram route cannot resolve, else ``"gram"``."""
        if self.method != "auto":
            return self.method
        uses_tol = self.rank is None and self.target_flops is None
        return "qr" if uses_tol and self.tol < GRAM_RELIABLE_ERROR else "gram"

    def _resolve_precision(self) -> str:
        """Gram of float32 products (summed in float64) unless ``tol`` asks for finer errors.

        Widths from ``rank``/``target_flops`` land where errors matter (>= 1e-3); a float64
        model's activations are multiplied in float64 either way.
        """
        uses_tol = self.rank is None and self.target_flops is None
        fine = uses_tol and self.tol < FLOAT32_GRAM_RELIABLE_ERROR
        return "float64" if fine else "native"

    def _find_blocks(self, work, units, batches, placement, example):
        """Set the block layout (``blocks_``); without one, move to ``device`` as usual.

        Returns the example inputs on the device where ``work`` now is (``_stage``).
        """
        stage, device, dtype = placement
        spec = self.blocks if self.calibration in ("original", "sequential") else None
        self._block_layout = find_blocks(work, example, spec, units)
        self.blocks_ = None if self._block_layout is None else self._block_layout.name
        self._stage = stage if self._block_layout is not None else device
        if self._block_layout is not None:
            batches.make_reusable()  # several passes over the data
        elif stage != device:
            work.to(device)
            example = example_inputs(batches.first, device, dtype)
        return example

    def _find_units(self, work, example):
        """Units of the work copy; NotPrunableError listing every skipped layer if none."""
        args, kwargs = example
        with torch.no_grad():
            run_model(work, args, kwargs, what="first samples of the calibration data")
        units, skipped = find_units(work, args, kwargs, layers=self.layers, exclude=self.exclude)
        self.skipped_ = [{"producer": s.producer, "reason": s.reason} for s in skipped]
        if self.verbose:
            for s in skipped:
                print(f"[NetworkCompressor] skipping {s.producer!r}: {s.reason}")
        if not units:
            reasons = "".join(f"\n  - {s.producer!r}: {s.reason}" for s in skipped)
            raise NotPrunableError(
                f"No prunable unit in this {type(work).__name__}: no Linear/Conv layer's output "
                f"channels reach exactly one following Linear/Conv through per-channel "
                f"operations only.{reasons or ' The model has no Linear/Conv layer.'}"
            )
        return units

    def _cache_key(self, model, batches: Batches, units) -> str:
        """Content key of the statistics: weights, architecture, data, units and method."""
        return fingerprint(
            model_fingerprint(model),
            _distributed.agreed_key(batches.fingerprint()),
            [repr(u) for u in units],
            self.method_,
            self._gram_precision,
        )

    # ----------------------------------------------------------------------------- plan

    def _plan(self, work, units, batches, key, flops_info):
        """Statistics → widths → selections, applied to ``work``; returns the selections."""
        cache = StatisticsCache(self.memory)
        if self._block_layout is not None:
            layout = self._block_layout
            return blockwise_plan(self, work, units, layout, batches, key, cache, flops_info,
                                  self._stage)
        if self.calibration == "original" or (
            self.target_flops is not None and self.calibration == "sequential"
        ):
            facs, self.n_calibration_samples_ = cache.get(
                key,
                work,
                units,
                batches,
                method=self.method_,
                precision=self._gram_precision,
                verbose=self.verbose,
            )
            widths = self._widths(facs, units, flops_info, work, batches)
            if self.calibration == "original":
                plan = [_selection(u, f, k) for u, f, k in zip(units, facs, widths, strict=True)]
                for selection in plan:
                    apply_selection(work, selection)
                return plan
            return self._sequential(work, units, batches, key, cache, widths)
        return self._sequential(work, units, batches, key, cache, None)

    def _sequential(self, work, units, batches, key, cache, widths):
        """Each unit from the model compressed so far (fixed ``widths`` or this fit's rule)."""
        plan = []
        for i, unit in enumerate(units):
            step_key = None if key is None else fingerprint(key, i, _plan_content(plan))
            (fac,), self.n_calibration_samples_ = cache.get(
                step_key,
                work,
                [unit],
                batches,
                method=self.method_,
                precision=self._gram_precision,
                verbose=self.verbose,
            )
            k = widths[i] if widths is not None else self._widths([fac], [unit], None)[0]
            selection = _selection(unit, fac, k)
            apply_selection(work, selection)
            plan.append(selection)
        return plan

    def _widths(self, facs, units, flops_info, work=None, batches=None) -> np.ndarray:
        """Kept width per unit from ``tol``, ``rank`` or ``target_flops``.

        For ``target_flops`` the greedy and the uniform allocation are both tried on the first
        calibration batch, and the one whose outputs stay closer to the model's wins: the
        error-per-FLOP greedy is a proxy, and must never do worse than a uniform cut.
        """
        errors = [fac.errors for fac in facs]
        if self.target_flops is not None:
            module_flops, total = flops_info
            model = _budget.FlopsModel.from_units(units, module_flops, total)
            candidates = _budget.flops_candidates(errors, model, self.target_flops)
            if len(candidates) == 1:
                return candidates[0]
            return _most_faithful(work, units, facs, candidates, batches.first)
        if self.rank is not None:
            return _budget.widths_for_rank([u.width for u in units], self.rank)
        return _budget.widths_for_tol(errors, self.tol)

    # ------------------------------------------------------------------------- outputs

    def transform(self, X) -> np.ndarray:
        """The compressed model's outputs, flattened per sample.

        Parameters
        ----------
        X : tensor, ndarray, dict of those, or iterable of batches
            Batched like the calibration data.

        Returns
        -------
        ndarray of shape (n_samples, n_outputs)
            A tuple or dict-like output is reduced to its first tensor.
        """
        check_is_fitted(self, "compressed_model_")
        return model_outputs(self.compressed_model_, X, self.batch_size)

    def fit_transform(self, *args, **kwargs) -> np.ndarray:
        """``fit(...)`` then ``transform(X)`` on the calibration data."""
        model, X = self._fit_arguments(args, dict(kwargs))
        return self.fit(model, X).transform(X)

    def predict(self, X) -> np.ndarray:
        """Top-1 class of the compressed model: argmax of :meth:`transform`, shape (n_samples,)."""
        return self.transform(X).argmax(axis=1)

    def score(self, X, y=None) -> float:
        """Top-1 agreement with the original model if ``y`` is None, else accuracy on ``y``."""
        if y is None:
            return metrics.agreement(self, X)
        return metrics.accuracy(self, X, y)

    def _original_outputs(self, X) -> np.ndarray:
        """The original model's outputs on ``X``, like :meth:`transform`.

        With ``memory`` they are cached by content, so the candidates of a grid search
        (clones, one per setting) run the original model over a test fold once.
        """
        check_is_fitted(self, "compressed_model_")
        if self.memory is None:
            return model_outputs(self._original_model, X, self.batch_size)
        batches = Batches(X, self.batch_size, reusable=True)
        key = fingerprint(model_fingerprint(self._original_model), batches.fingerprint())
        cached = StatisticsCache(self.memory).memory.cache(
            _keyed_outputs, ignore=["model", "batches", "batch_size"]
        )
        return cached(key, model=self._original_model, batches=batches, batch_size=self.batch_size)


# ---------------------------------------------------------------------------------- helpers


def _working_copy(model: nn.Module, device) -> nn.Module:
    """A deep copy of ``model`` on ``device``, in eval mode (the caller's model is untouched)."""
    work = copy.deepcopy(model)
    return work.to(device).eval()


def _selection(unit, fac, k) -> Selection:
    """The plan record of one unit kept at width ``k``."""
    if fac.n_features != unit.width:
        raise RuntimeError(
            f"Internal error: the statistics of {unit.producer!r} have {fac.n_features} "
            f"channels, the unit {unit.width}."
        )
    keep, T = fac.select(int(k))
    return Selection(
        unit=unit,
        keep=torch.as_tensor(keep, dtype=torch.int64),
        interpolation=torch.as_tensor(T),
        error=float(fac.errors[int(k)]),
    )


def _most_faithful(work, units, facs, candidates, batch) -> np.ndarray:
    """The candidate widths whose compressed model's outputs on ``batch`` stay closest."""
    device, dtype = model_device_dtype(work)
    args, kwargs = to_inputs(batch, device, dtype)
    with torch.no_grad():
        reference = _first_tensor(run_model(work, args, kwargs)).double()

        def output_error(widths) -> float:
            trial = copy.deepcopy(work)
            for unit, fac, k in zip(units, facs, widths, strict=True):
                apply_selection(trial, _selection(unit, fac, k))
            outputs = _first_tensor(run_model(trial, args, kwargs)).double()
            return float(torch.linalg.vector_norm(outputs - reference))

        return min(candidates, key=output_error)


def _plan_content(plan) -> list:
    """What the selections applied so far changed, for a content key."""
    return [[repr(s.unit), s.keep, s.interpolation] for s in plan]


def _layer_report(selection: Selection) -> dict:
    """One row of ``layers_``."""
    return {
        "producer": selection.unit.producer,
        "consumer": selection.unit.consumer,
        "width_before": int(selection.unit.width),
        "width_after": int(selection.keep.numel()),
        "error": float(selection.error),
    }


def _keyed_outputs(key, *, model, batches, batch_size) -> np.ndarray:
    """:func:`model_outputs` with a content key as the cache's argument (joblib hashes it)."""
    return model_outputs(model, batches, batch_size)


def model_outputs(model: nn.Module, X, batch_size: int) -> np.ndarray:
    """A model's outputs on ``X`` (eval, no_grad), first tensor, as (n_samples, outputs)."""
    device, dtype = model_device_dtype(model)
    outputs = []
    with _eval_mode(model), torch.no_grad():
        for batch in Batches(X, batch_size):
            args, kwargs = to_inputs(batch, device, dtype)
            out = _first_tensor(run_model(model, args, kwargs, what="batch"))
            out = out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1, 1)
            if out.dtype in (torch.float16, torch.bfloat16):
                out = out.float()
            outputs.append(out.cpu())
    return torch.cat(outputs).numpy()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration, then every submodule's training flag as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def _first_tensor(output) -> torch.Tensor:
    """A model output reduced to its first tensor (tuple, list, dict or HF ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "values") and callable(output.values):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        items = []
    for item in items:
        with contextlib.suppress(TypeError):
            return _first_tensor(item)
    raise TypeError(f"The model returned a {type(output).__name__} without any tensor.")
