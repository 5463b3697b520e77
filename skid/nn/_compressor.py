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
import sys
import warnings
from dataclasses import replace

import joblib
import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .. import _corrective, _policy, metrics
from .._linalg import PivotedFactorization, factorize_for_outputs
from .._validation import Interval, Options, SubsetOf, check_params
from ..exceptions import NotPrunableError
from . import _budget, _distributed, _intercept, _sensitivity
from ._blocks import blockwise_plan, find_blocks
from ._calibration import (
    Batches,
    StatisticsCache,
    calibration_passes,
    example_inputs,
    fingerprint,
    model_device_dtype,
    model_fingerprint,
    reading_consumers,
    run_model,
    to_inputs,
)
from ._flops import count_flops, count_params
from ._graph import find_units
from ._heads import (
    CorrectiveHeadFactorization,
    apply_head_selection,
    find_heads,
    in_forward_order,
)
from ._joint import interpolations_for
from ._model_checks import check_model
from ._plan import Selection, offset_of
from ._surgery import (
    apply_selection,
    concat_widths,
    fold_constant,
    sharing_copy,
    weight_gram,
)

__all__ = ["NetworkCompressor"]

#: What ``prune`` may name: channel groups, attention heads.
_STRUCTURES = ("channels", "heads")

#: Pivot rule of ``objective="outputs"`` (see :func:`skid._linalg.factorize_for_outputs`).
_OUTPUT_PIVOTS = "scaled"


class NetworkCompressor(TransformerMixin, BaseEstimator):
    """Compress a trained torch model with the interpolative decomposition, without fine-tuning.

    Unlabeled calibration inputs are run through the model. For every *channel group* — the
    output channels of one or more ``Linear``/``Conv`` producers (several when joined by an
    elementwise product: a gated MLP ``down(act(gate(x)) * up(x))``, a squeeze-excitation gate),
    passed through per-channel operations and read only by following ``Linear``/``Conv``
    consumers (one or several, possibly at an offset of a concatenation, or group by group in a
    grouped convolution) — the activations ``Z`` as a consumer reads them (rows: samples, and
    spatial positions for convolutions; columns: channels) get a column ID ``Z ≈ Z[:, J] T``.
    Every producer keeps channels ``J`` (and so does every per-channel op in between) and each
    consumer gets its own least-squares ``T`` folded in, so it sees ``Z[:, J] T ≈ Z``. When the
    consumers read different tensors (the SE gate's pooled input and the gated activations),
    ``J`` is the ID of their activations stacked, each scaled to unit Frobenius norm.

    Parameters
    ----------
    model : torch.nn.Module, default=None
        The trained model; never modified. May instead be given to ``fit(model, X)``.
    tol : float in [0, 1), default=1e-2
        Relative ID error ``‖Z − Z[:, J] T‖_F / ‖Z‖_F`` allowed in every unit: each keeps the
        fewest channels that meet it (a different width per unit).
    rank : float in (0, 1], default=None
        Keep ``ceil(rank * width)`` channels of every group instead of using ``tol`` (rounded
        down to a multiple of a grouped convolution's groups).
    target_flops : float in (0, 1), default=None
        Keep this fraction of the model's FLOPs instead of using ``tol``; widths are chosen
        greedily by the increase of the squared relative ID error per FLOP saved, the errors
        weighted by what each unit's error does to the model's output (each unit alone cut to
        the uniform width on the first calibration batch: one forward pass per unit). That
        allocation, the unweighted one, the largest uniform fraction of every unit within the
        budget (plain and with the leftover budget refilled) and, with channels and heads, the
        uniform cut of each kind alone are tried on calibration rows held out of the
        statistics their folds are fitted with (the last batch; one more statistics pass),
        and the one whose outputs stay closest to the model's is kept, so on those rows it is
        never worse than keeping the same fraction of every unit. Block-wise, and when the
        data has one batch, the candidates are judged on the second (or only) batch, in-sample.
    layers : "auto" or list of str or (str, str), default="auto"
        Restrict pruning to the groups of these producers (qualified names as in
        ``model.named_modules()``) or ``(producer, consumer)`` pairs.
    exclude : list of str, default=()
        Modules never to prune (with everything inside them).
    prune : {"channels", "heads"} or collection of them, default=("channels", "heads")
        What to narrow. ``"channels"``: channel groups (neurons, conv channels, gated MLP
        widths). ``"heads"``: the heads of self-attention blocks (HF LLaMA/Qwen2/Mistral/ViT
        ``q/k/v/o_proj``, BERT/RoBERTa ``self.query/key/value`` + ``output.dense``, GPT-2's
        fused ``c_attn``): whole heads are kept by a block ID of the output projection's
        input and the least-squares correction is folded into the output projection; with
        grouped-query attention every key/value group keeps the same number of query heads,
        or whole groups go, whichever has the smaller error, so the model's own code runs.
        For heads, ``rank`` is the fraction of each key/value group's heads, ``width_before``
        and ``width_after`` count heads, and ``target_flops`` counts the attention scores.
        With ``calibration="corrective"`` the heads are chosen on the compressed model's
        output-projection input and ``T`` is fitted to the original model's.
    objective : {"activations", "outputs"}, default="activations"
        What the kept channels must reconstruct. ``"activations"`` (the paper): the consumer's
        input ``Z``; ``tol`` and the reported errors are ``‖Z − Z_J T‖_F / ‖Z‖_F``.
        ``"outputs"``: what the consumer computes from it, ``Z Wᵀ`` (its weights enter the
        pivoting: columns are scaled by the norms of the consumer weights that read them);
        ``tol`` and the errors are then ``‖(Z − Z_J T) Wᵀ‖_F / ‖Z Wᵀ‖_F`` (for convolutions
        and flattened inputs, without the cross terms between kernel positions). ``T`` is
        the least-squares fit on ``Z`` either way.
    calibration : {"original", "sequential", "corrective"}, default="original"
        ``"original"``: every unit's ID from the original model's activations, one pass.
        ``"sequential"``: units in forward order, each from the model compressed so far (one
        pass per unit; with ``target_flops`` the widths come from a first, original pass).
        ``"corrective"``: units in forward order; channels chosen from the compressed model's
        consumer input ``Z_c`` and ``T`` fitted by least squares to the *original* model's
        ``Z_o`` (``min ‖Z_o − Z_c[:, J] T‖_F``), so each consumer sees what the original fed
        it, upstream errors included. Two truncated passes per unit (the original and the
        compressed model on the same batches; one for the first unit) and a second copy of
        the model on ``device``. Widths as ``"sequential"``; ``tol`` is then met against
        ``Z_o`` (a unit whose upstream error alone exceeds it keeps its full width).
    blocks : "auto", str or None, default="auto"
        Block-wise calibration. ``"auto"`` finds the longest ``nn.ModuleList`` whose members
        run one after another on the previous one's output (HF decoder/encoder layers); a
        qualified name picks that list (an error if it does not qualify); None turns it off.
        The blocks are then calibrated one at a time: the inputs of the next block are cached
        for every calibration batch (on the host, or as files under ``memory``), only the
        current block's statistics are held, and with ``device`` set only the current block
        (and the code around the blocks) is moved there, so a model larger than the device can
        be compressed. Every ``calibration`` gives its one-pass result (``"corrective"`` walks
        a copy of the original blocks beside them). With ``"original"`` a block runs once per
        batch; ``"sequential"``/``"corrective"`` add their per-unit passes, each up to that
        unit. ``target_flops`` walks the blocks twice (three times unless ``"original"``): once
        for every unit's error curve, then to build the allocation. ``"auto"`` falls back to
        one pass when no list qualifies (``blocks_`` is None).
    method : {"auto", "gram", "qr"}, default="auto"
        Statistic streamed per unit: ``"gram"`` (``ZᵀZ`` summed in float64, then pivoted
        Cholesky: the fastest, errors resolved down to about 1e-4; float32 activations are
        multiplied in float32 unless ``tol < 1e-3``), ``"qr"`` (TSQR factor: accurate to the
        data's rounding, 2-4× the work). ``"auto"`` uses ``"qr"`` only for ``tol`` below
        1e-4. The rules are ``InterpolativeDecomposition``'s (``skid._policy``), re-check
        included: see Notes.
    fit_intercept : bool, default=False
        Fit ``T`` with a constant column, ``Z ≈ Z[:, J] T + 1 bᵀ`` (the ID of the centred
        activations, ``b = μ − Tᵀ μ_J``), and fold the constant into each consumer's bias,
        ``c ← c + W b`` (a consumer without a bias gets one). One bias vector per consumer
        buys what FLAP's bias compensation buys, at every width; exact at full width. For a
        convolution with zero padding the constant is exact away from the borders. Groups
        read as several tensors or by grouped convolutions keep no constant. A Hugging Face
        model gets its config's ``mlp_bias``/``attention_bias`` set (and zero biases in the
        other layers of those families) so that ``save_pretrained`` output reloads; a
        consumer no config flag governs (Qwen2's MLP, say) is refused with the reason.
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
        Cache of the calibration statistics, keyed on the model's weights, the ops its forward
        pass runs, skid's and torch's versions, the data and the settings: refits with another
        ``tol``/``rank``/``target_flops`` skip the forward passes.
        A one-shot iterator of batches is read into memory when this is set.
    verbose : bool, default=False
        Show a progress bar over the calibration batches and list the skipped layers.

    Attributes
    ----------
    compressed_model_ : torch.nn.Module
        The compressed copy (same classes, narrower), in eval mode, on the model's device and
        dtype.
    layers_ : list of dict
        One per pruned channel group: ``kind`` (``"channels"``), ``producers`` and
        ``consumers`` (lists of qualified names), ``producer`` and ``consumer`` (the first of
        each), ``width_before``, ``width_after``, ``error``. ``pandas.DataFrame(layers_)`` is
        the report. ``error`` is the relative error on the calibration data of what the
        consumers see: the ID error ``‖Z − Z[:, J] T‖_F / ‖Z‖_F`` of their input ``Z`` in the
        model it was calibrated on (the original, or for ``"sequential"`` the model compressed
        so far; for consumers reading different tensors, the root mean square over them); for
        ``"corrective"``, ``‖Z_o − Z_c[:, J] T‖_F / ‖Z_o‖_F`` against the original model's
        input ``Z_o``, upstream units' errors included; for ``objective="outputs"``, the same
        for the consumer's output ``Z Wᵀ``.
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
        statistic came from ``memory``); ``"corrective"`` counts the original's and the
        compressed model's run of a batch as two.
    method_ : str
        ``"gram"`` or ``"qr"``, what ``method="auto"`` resolved to (the route every unit
        starts on; see Notes for the units recomputed on a finer one).
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

    Like ``InterpolativeDecomposition.fit``, a unit whose width the route that ran does not
    resolve is recomputed on a finer one, with one more calibration pass over that unit: when
    a ``rank`` or ``target_flops`` width's error lands below 1e-3 (float32 products) or 1e-4
    (float64), or a width goes past the pivots clear of the statistic's rounding. The pass
    uses QR (``method="auto"``) or float64 products (``method="gram"``). ``tol`` widths are then
    chosen again; ``rank``/``target_flops`` widths stay. A one-shot iterator of batches cannot
    be read again: a warning says so and the first statistics are used.

    A unit sees rows = samples (× positions, for convolutions and sequences). With fewer rows
    than channels, at most that many channels are fitted to the data; a warning names the
    unit.

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
        "prune": [Options(_STRUCTURES), SubsetOf(_STRUCTURES)],
        "objective": [Options(("activations", "outputs"))],
        "calibration": [Options(("original", "sequential", "corrective"))],
        "blocks": [None, str],
        "method": [Options(("auto", "gram", "qr"))],
        "fit_intercept": [bool],
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
        prune=("channels", "heads"),
        objective="activations",
        calibration="original",
        blocks="auto",
        method="auto",
        fit_intercept=False,
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
        self.prune = prune
        self.objective = objective
        self.calibration = calibration
        self.blocks = blocks
        self.method = method
        self.fit_intercept = fit_intercept
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
        multi_pass = self.memory is not None or self.calibration != "original"
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
        own = [u.attention for u in units if u.kind == "heads"]  # attention scores
        flops_before, module_flops = count_flops(work, *example, own=own)
        params_before = count_params(work)
        passes_before = calibration_passes()
        # the model's weights and the code it runs, keyed once per fit
        self._model_key = None if self.memory is None else model_fingerprint(work, *example)
        key = None if self.memory is None else self._cache_key(self._model_key, batches, units)
        with _intercept.fitting_intercept(self.fit_intercept):
            bias_flags = _intercept.hf_bias_flags(work, _new_biases(work, units))
            plan = self._plan(work, units, batches, key, (module_flops, flops_before))
        _intercept.set_hf_bias_flags(work, bias_flags)
        self.n_calibration_passes_ = calibration_passes() - passes_before
        self.flops_ = {"before": int(flops_before), "after": int(count_flops(work, *example)[0])}
        self.params_ = {"before": int(params_before), "after": int(count_params(work))}
        self.layers_ = [_layer_report(s) for s in plan]
        self._selections = plan  # what was applied, for benchmarks and baselines
        self.compressed_model_ = work.to(home).eval()
        self._original_model = model
        return self

    def _fit_arguments(self, args, kwargs):
        """``(model, X)`` from ``fit(model, X[, y])``, ``fit(X[, y])`` or keywords."""
        args = list(args)
        # data is never callable: a callable first argument was meant as the model
        model = args.pop(0) if args and callable(args[0]) else None
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
        check_model(model)
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
        if self.objective == "outputs" and self.calibration == "corrective":
            raise ValueError(
                "objective='outputs' is not supported with calibration='corrective' yet: use "
                "calibration='original' or 'sequential' with it, or objective='activations'."
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device={self.device!r} is not a torch device: {exc}") from exc

    def _resolve_method(self) -> str:
        """``"qr"`` for tolerances the Gram route cannot resolve, else ``"gram"`` (the policy)."""
        if self.method != "auto":
            return self.method
        return _policy.exact_route(self._tol_request())

    def _resolve_precision(self) -> str:
        """Gram of float32 products (summed in float64) unless ``tol`` asks for finer errors.

        Widths from ``rank``/``target_flops`` start there and are re-checked (see
        :meth:`_recheck`); a float64 model's activations are multiplied in float64 either way.
        """
        tol = self._tol_request()
        return _policy.gram_precision(float32_data=True, tol=tol, width_request=tol is None)

    def _tol_request(self):
        """``tol`` when it decides the widths, None when ``rank`` or ``target_flops`` does."""
        return self.tol if self.rank is None and self.target_flops is None else None

    def _find_blocks(self, work, units, batches, placement, example):
        """Set the block layout (``blocks_``); without one, move to ``device`` as usual.

        Returns the example inputs on the device where ``work`` now is (``_stage``).
        """
        stage, device, dtype = placement
        self._block_layout = find_blocks(work, example, self.blocks, units)
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
        prune = {self.prune} if isinstance(self.prune, str) else set(self.prune)
        units, skipped = [], []
        if "channels" in prune:
            units, skipped = find_units(work, args, kwargs, layers=self.layers,
                                        exclude=self.exclude)
        if "heads" in prune:
            heads, skipped_heads = find_heads(work, args, kwargs, exclude=self.exclude)
            if self.layers != "auto":  # heads are named by their attention block
                wanted = {n if isinstance(n, str) else n[0] for n in self.layers}
                heads = [h for h in heads if h.attention in wanted or h.producer in wanted]
            units = in_forward_order(work, units + heads, args, kwargs)
            skipped += skipped_heads
        self.skipped_ = [{"producer": s.producer, "reason": s.reason} for s in skipped]
        if self.verbose:
            for s in skipped:
                print(f"[NetworkCompressor] skipping {s.producer!r}: {s.reason}")
        if not units:
            reasons = "".join(f"\n  - {s.producer!r}: {s.reason}" for s in skipped)
            raise NotPrunableError(
                f"No prunable unit in this {type(work).__name__} (prune={self.prune!r}): no "
                f"Linear/Conv layer's output channels reach only following Linear/Conv layers "
                f"through per-channel operations and gates, and no attention block's heads "
                f"can be pruned.{reasons or ' The model has no Linear/Conv layer.'}"
            )
        return units

    def _cache_key(self, model_key: str, batches: Batches, units) -> str:
        """Content key of the statistics: the model's key, the data, the units and method."""
        return fingerprint(
            model_key,
            _distributed.agreed_key(batches.fingerprint()),
            [repr(u) for u in units],
            self.method_,
            self._gram_precision,
            self.fit_intercept,
        )

    # ----------------------------------------------------------------------------- plan

    def _plan(self, work, units, batches, key, flops_info):
        """Statistics → widths → selections, applied to ``work``; returns the selections."""
        cache = StatisticsCache(self.memory)
        if self._block_layout is not None:
            layout = self._block_layout
            return blockwise_plan(self, work, units, layout, batches, key, cache, flops_info,
                                  self._stage)
        if self.calibration == "corrective":
            return self._corrective(work, units, batches, key, cache, flops_info)
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
            _warn_few_rows(units, facs)
            facs = self._for_objective(work, units, facs)
            widths = self._widths(facs, units, flops_info, work, batches, (key, cache))
            if self.calibration == "original":
                facs, widths = self._recheck(work, units, facs, widths, batches, key, cache)
                plan = [_selection(u, f, k) for u, f, k in zip(units, facs, widths, strict=True)]
                for selection in plan:
                    _apply(work, selection)
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
            _warn_few_rows([unit], [fac])
            (fac,) = self._for_objective(work, [unit], [fac])
            k = widths[i] if widths is not None else self._widths([fac], [unit], None)[0]
            (fac,), (k,) = self._recheck(work, [unit], [fac], [k], batches, step_key, cache)
            selection = _selection(unit, fac, k)
            _apply(work, selection)
            plan.append(selection)
        return plan

    def _for_objective(self, work, units, facs) -> list:
        """The factorizations re-pivoted for the consumers' outputs when ``objective`` says so.

        Two pivot rules were measured (``benchmarks/bench_transformers.py``): scaling each
        column by the norm of the consumer weights that read it, and a greedy on the output
        error; on MiniLM at half FFN width the scaling kept more (mean embedding cosine 0.954
        against 0.939) for a sixth of the time (``_OUTPUT_PIVOTS``).
        Groups whose consumers read different tensors, or grouped convolutions, keep the
        activation objective (with a warning): their joint statistic has no single output.
        """
        if self.objective == "activations":
            return facs
        result, kept = [], []
        for unit, fac in zip(units, facs, strict=True):
            if unit.kind == "heads":
                result.append(fac.for_outputs(_consumer_weight_gram(work, unit,
                                                                    unit.consumers[0])))
                if getattr(fac, "means", None) is not None:  # fit_intercept
                    result[-1].means = fac.means
                continue
            if isinstance(fac, _intercept.InterceptFactorization):
                weights = sum(_consumer_weight_gram(work, unit, c) for c in unit.consumers)
                result.append(fac.for_outputs(
                    lambda f, w=weights: factorize_for_outputs(f, w, _OUTPUT_PIVOTS)))
                continue
            if not isinstance(fac, PivotedFactorization):
                result.append(fac)
                kept.append(unit.producer)
                continue
            weights = sum(_consumer_weight_gram(work, unit, c) for c in unit.consumers)
            result.append(factorize_for_outputs(fac, weights, _OUTPUT_PIVOTS))
        if kept:
            warnings.warn(
                f"objective='outputs' does not apply to the groups of {kept}: their consumers "
                "read different tensors or are grouped convolutions; they keep the activation "
                "objective.", UserWarning, stacklevel=3,
            )
        return result

    def _corrective(self, work, units, batches, key, cache, flops_info):
        """Units in forward order, each ``T`` fitted to the original model's activations.

        ``target_flops`` widths come from the one-pass (original) error curves, as for
        ``"sequential"``; ``tol``/``rank`` widths from each step's corrective error curve.
        """
        widths = None
        if self.target_flops is not None:
            facs, self.n_calibration_samples_ = cache.get(
                key, work, units, batches, method=self.method_, precision=self._gram_precision,
                verbose=self.verbose)
            widths = self._widths(facs, units, flops_info, work, batches, (key, cache))
        reference = sharing_copy(work)  # the original (folds into work replace its tensors)
        plan = []
        for i, unit in enumerate(units):
            step_key = None if key is None else fingerprint(
                key, "corrective", i, _plan_content(plan))
            upstream = reference if plan else None  # nothing compressed yet: Z_o = Z_c
            k = None if widths is None else widths[i]
            selection = self._corrective_selection(work, upstream, unit, k, step_key, cache,
                                                   batches)
            _apply(work, selection)
            plan.append(selection)
        return plan

    def _corrective_selection(self, work, reference, unit, k, step_key, cache, batches,
                              before_pass=None) -> Selection:
        """One unit's corrective selection at width ``k`` (None: from this fit's rule).

        ``reference`` is the original model (None while nothing upstream is compressed);
        ``before_pass`` is called before each statistics pass (block-wise: rewind the tapes).
        """
        settings = dict(method=self.method_, precision=self._gram_precision,
                        verbose=self.verbose)
        rewind = before_pass or (lambda: None)
        if not _corrective_applies(unit):
            return self._corrective_group(work, reference, unit, k, step_key, cache, batches,
                                          settings, rewind)
        rewind()
        stats, self.n_calibration_samples_ = cache.corrective(
            step_key, work, reference, unit, batches, **settings)
        if unit.kind == "heads":
            fac = CorrectiveHeadFactorization(stats, unit)
            fac.means = stats.means  # fit_intercept: the constant of the selection
        else:
            fac = stats.factorize(_corrective.DEFAULT_SELECTION)
        k = self._widths([fac], [unit], None)[0] if k is None else k
        return _selection(unit, fac, k)

    def _corrective_group(self, work, reference, unit, k, step_key, cache, batches, settings,
                          rewind) -> Selection:
        """A group read as several tensors, as slices of a concatenation or by a grouped
        convolution: ``J`` from the compressed model's statistics of all its readings (as
        ``"sequential"`` chooses it), then each reading's ``T`` fitted to the original model's
        reading by least squares (block-diagonal for a grouped convolution)."""
        rewind()
        (fac,), self.n_calibration_samples_ = cache.get(step_key, work, [unit], batches,
                                                        **settings)
        k = self._widths([fac], [unit], None)[0] if k is None else k
        keep = np.asarray(fac.select(int(k))[0], dtype=np.int64)
        per_reading, squared = {}, []
        for consumer in reading_consumers(unit):
            key = None if step_key is None else fingerprint(step_key, "reads", consumer.reads)
            rewind()
            stats, _ = cache.corrective(key, work, reference, unit, batches, consumer=consumer,
                                        **settings)
            T, error = _corrective.fit_kept(stats, keep, unit.blocks)
            per_reading[consumer.reads] = torch.as_tensor(T)
            squared.append(error**2)
        per_consumer = tuple(per_reading[c.reads] for c in unit.consumers)
        return Selection(
            unit=unit, keep=torch.as_tensor(keep), interpolation=per_consumer[0],
            error=float(np.sqrt(np.mean(squared))),
            interpolations=per_consumer if unit.n_readings > 1 else None,
        )

    def _widths(self, facs, units, flops_info, work=None, batches=None,
                stored=(None, None)) -> np.ndarray:
        """Kept width per unit from ``tol``, ``rank`` or ``target_flops``.

        For ``target_flops`` the units' output weights are measured on the first calibration
        batch (:mod:`skid.nn._sensitivity`), every candidate of :meth:`_flops_candidates` is
        tried on the held-out second batch, and the one whose outputs stay closest to the
        model's wins: the error-per-FLOP greedy is a proxy, and must never do worse than a
        uniform cut.
        """
        if self.target_flops is not None:
            if all(hasattr(fac, "select") for fac in facs):
                return self._faithful_widths(facs, units, flops_info, work, batches, stored)
            candidates = self._flops_candidates(facs, units, flops_info, work)
            if len(candidates) == 1:
                return candidates[0]
            return _most_faithful(work, units, facs, candidates,
                                  _sensitivity.held_out_batch(batches))
        if self.rank is not None:
            return np.array([
                fac.width_for_rank(self.rank) if u.kind == "heads"
                else _budget.widths_for_rank([u.width], self.rank)[0]
                for u, fac in zip(units, facs, strict=True)], dtype=np.int64)
        return _budget.widths_for_tol([fac.errors for fac in facs], self.tol)

    def _flops_candidates(self, facs, units, flops_info, work, weights=None,
                          plain=False) -> list:
        """The ``target_flops`` allocations worth comparing (:func:`_budget.flops_candidates`:
        greedy, uniform, each kind's uniform cut alone, and with ``weights`` the greedy on the
        output-weighted curves), head counts rounded to counts the model's code runs.
        ``plain``: only the plain uniform cut. ``facs`` need only ``errors`` (and, for heads,
        ``valid_counts`` and ``valid``): an :class:`ErrorCurve` will do."""
        module_flops, total = flops_info
        model = _budget.FlopsModel.from_units(units, module_flops, total,
                                              concat_widths(work, units))
        minimum = [fac.valid_counts[0] if u.kind == "heads" else 1
                   for u, fac in zip(units, facs, strict=True)]
        errors = [fac.errors for fac in facs]
        if plain:
            found = [_budget.uniform_widths(model, self.target_flops, minimum)]
        else:
            found = _budget.flops_candidates(errors, model, self.target_flops, minimum,
                                             weights=weights, kinds=[u.kind for u in units])
        return [
            np.array([fac.valid(k) if u.kind == "heads" else k  # a count the code runs
                      for u, fac, k in zip(units, facs, widths, strict=True)])
            for widths in found
        ]

    def _faithful_widths(self, facs, units, flops_info, work, batches,
                         stored=(None, None)) -> np.ndarray:
        """``target_flops`` with factorizations at hand (one pass): the output weights, the
        candidates, and the one whose outputs stay closest on held-out calibration rows.

        Where the data split (:func:`_sensitivity.split_held_out`), a second statistics pass
        without the last batch gives the folds the candidates are built with, and that batch
        judges them; otherwise the second batch (in-sample) judges.
        """
        split = _sensitivity.split_held_out(batches)
        fitted, judge = facs, _sensitivity.held_out_batch(batches)
        if split is not None:
            rest, judge = split
            key, cache = stored  # the statistics cache of the fit (memory=), and its key
            fitted, _ = (cache or StatisticsCache(None)).get(
                None if key is None else fingerprint(key, "held out"), work, units, rest,
                method=self.method_, precision=self._gram_precision, verbose=self.verbose)
            fitted = self._for_objective(work, units, fitted)
        weights = None
        if len(units) > 1:
            (uniform,) = self._flops_candidates(facs, units, flops_info, work, plain=True)
            first = batches.first if split is None else split[0].first
            weights = _sensitivity.output_weights(work, units, fitted, uniform, first)
        candidates = self._flops_candidates(facs, units, flops_info, work, weights)
        if len(candidates) == 1:
            return candidates[0]
        return _most_faithful(work, units, fitted, candidates, judge)

    def _recheck(self, work, units, facs, widths, batches, key, cache, before_pass=None):
        """Recompute on a finer route the units whose width the route that ran does not resolve.

        The estimator's refit, unit by unit: the same rule (:func:`skid._policy.finer_route`)
        says when — a width request's error below what the route resolves, or a width past
        the pivots clear of the statistic's rounding. Where the estimator steps float32
        products → float64 products → QR over data in memory, each step here is a calibration
        pass, so ``method="auto"`` goes to QR at once: one more pass over the units concerned
        (none for the usual ``tol >= 1e-3``); ``method="gram"`` goes to float64 products.
        ``tol`` widths are chosen again from the finer errors; ``rank``/``target_flops``
        widths stay. A one-shot iterator of batches cannot be read again: a warning says so
        and the first statistics are kept.
        """
        facs, widths = list(facs), np.array(widths, dtype=np.int64)
        routes = [(self.method_, self._gram_precision)] * len(units)
        tol = self._tol_request()
        while True:
            finer = {}
            for i, (method, precision) in enumerate(routes):
                if not isinstance(facs[i], PivotedFactorization):
                    continue  # heads, joint and block statistics: no finer route yet
                route = _policy.finer_route(
                    facs[i], int(widths[i]), method=method, precision=precision,
                    auto=self.method == "auto", width_request=tol is None,
                )  # fmt: skip
                if route is not None and self.method == "auto":
                    route = ("qr", route[1])  # a pass costs more than QR: the finest at once
                if route is not None:
                    finer.setdefault(route, []).append(i)
            if not finer:
                return facs, widths
            if not batches.rereadable:
                names = sorted({units[i].producer for idx in finer.values() for i in idx})
                warnings.warn(
                    f"The statistics of {names} do not resolve the chosen widths on the "
                    f"{self.method_!r} route, and the one-shot iterator of batches cannot be "
                    "read again to recompute them on a finer one; pass a tensor, a list or a "
                    "DataLoader (or method='qr').",
                    UserWarning,
                    stacklevel=_caller_outside_skid(),
                )
                return facs, widths
            for (method, precision), idx in finer.items():
                if before_pass is not None:
                    before_pass()  # block-wise: replay the cached block inputs from the start
                sub_key = None if key is None else fingerprint(key, method, precision, idx)
                finer_facs, _ = cache.get(
                    sub_key, work, [units[i] for i in idx], batches,
                    method=method, precision=precision, verbose=self.verbose,
                )  # fmt: skip
                finer_facs = self._for_objective(work, [units[i] for i in idx], finer_facs)
                for i, fac in zip(idx, finer_facs, strict=True):
                    facs[i], routes[i] = fac, (method, precision)
                    if tol is not None:
                        widths[i] = _policy.width_for_tol(fac.errors, tol)

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
        model_key = getattr(self, "_model_key", None)
        if model_key is None:  # memory was set after fit
            example = example_inputs(batches.first, *model_device_dtype(self._original_model))
            model_key = model_fingerprint(self._original_model, *example)
        key = fingerprint(model_key, batches.fingerprint())
        cached = StatisticsCache(self.memory).memory.cache(
            _keyed_outputs, ignore=["model", "batches", "batch_size"]
        )
        return cached(key, model=self._original_model, batches=batches, batch_size=self.batch_size)


# ---------------------------------------------------------------------------------- helpers


def _working_copy(model: nn.Module, device) -> nn.Module:
    """A deep copy of ``model`` on ``device``, in eval mode (the caller's model is untouched)."""
    work = copy.deepcopy(model)
    return work.to(device).eval()


def _corrective_applies(unit) -> bool:
    """Whether one corrective statistic gives the unit's selection: all consumers read one
    whole tensor (no concatenation slice) and no grouped convolution asks for a block-diagonal
    ``T`` (attention heads: the output projection's input). Other groups take
    :meth:`NetworkCompressor._corrective_group`."""
    return unit.n_readings == 1 and unit.blocks == 1 and not any(
        c.before for c in unit.consumers)


def _consumer_weight_gram(work, unit, consumer) -> np.ndarray:
    """``WᵀW`` of one consumer over the group's channels (its slice of a concatenation)."""
    gram = weight_gram(work.get_submodule(consumer.name), consumer.positions)
    start = offset_of(work, consumer.before)
    stop = start + (unit.width if unit.kind == "channels" else gram.shape[0])
    return gram[start:stop, start:stop]


def _apply(model, selection) -> None:
    """Apply a channel group's or an attention block's selection to ``model`` in place."""
    if selection.unit.kind == "heads":
        if selection.intercept is not None:  # W b from the output projection before the fold
            fold_constant(model.get_submodule(selection.unit.consumer), selection.intercept)
        apply_head_selection(model, selection)
    else:
        apply_selection(model, selection)


def _caller_outside_skid() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside skid."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _warn_few_rows(units, facs) -> None:
    """Warn for every unit whose statistic saw fewer rows than it has channels."""
    for unit, fac in zip(units, facs, strict=True):
        rows = getattr(fac, "n_samples", None)
        if rows is not None and rows < unit.width:
            warnings.warn(
                f"The unit {unit.producer!r} → {unit.consumer!r} has {unit.width} channels but "
                f"saw only {rows} calibration rows (samples × positions): at most {rows} "
                "channels are fitted to the data, and the rest of the kept channels only copy "
                f"themselves. Calibrate on at least {unit.width} rows.",
                UserWarning,
                stacklevel=_caller_outside_skid(),
            )


def _selection(unit, fac, k) -> Selection:
    """The plan record of one unit kept at width ``k`` (heads: the nearest valid count)."""
    if unit.kind == "heads":
        selection = fac.select(int(k))
        d = unit.head_dim
        columns = (selection.heads[:, None] * d + np.arange(d)).ravel()
        b = _intercept.intercept(fac, columns, selection.interpolation)
        return selection if b is None else replace(selection, intercept=b)
    if fac.n_features != unit.width:
        raise RuntimeError(
            f"Internal error: the statistics of {unit.producer!r} have {fac.n_features} "
            f"channels, the unit {unit.width}."
        )
    keep, T = fac.select(int(k))
    per_consumer = interpolations_for(unit, fac, keep, T)
    b = _intercept.intercept(fac, keep, T)
    return Selection(
        unit=unit,
        keep=torch.as_tensor(keep, dtype=torch.int64),
        interpolation=torch.as_tensor(T if per_consumer is None else per_consumer[0]),
        error=float(fac.errors[len(keep)]),  # a grouped width may round k down
        interpolations=None if per_consumer is None else tuple(
            torch.as_tensor(t) for t in per_consumer),
        intercepts=None if b is None else (torch.as_tensor(b),) * len(unit.consumers),
    )


def _new_biases(work, units) -> list:
    """Consumers that ``fit_intercept`` gives a bias they do not have yet."""
    names = [c.name for u in units if _intercept.applies(u) for c in u.consumers]
    return [n for n in names if getattr(work.get_submodule(n), "bias", None) is None]


def _most_faithful(work, units, facs, candidates, batch) -> np.ndarray:
    """The candidate widths whose compressed model's outputs on ``batch`` stay closest."""
    reference = batch_outputs(work, batch)

    def output_error(widths) -> float:
        trial = sharing_copy(work)
        for unit, fac, k in zip(units, facs, widths, strict=True):
            _apply(trial, _selection(unit, fac, k))
        return output_distance(trial, reference, batch)

    return min(candidates, key=output_error)


def batch_outputs(model, batch) -> torch.Tensor:
    """``model``'s (first) output on one calibration batch, in float64: what the candidates of
    ``target_flops`` are compared on."""
    device, dtype = model_device_dtype(model)
    args, kwargs = to_inputs(batch, device, dtype)
    with torch.no_grad():
        return _first_tensor(run_model(model, args, kwargs)).double()


def output_distance(model, reference, batch) -> float:
    """Frobenius distance of ``model``'s outputs on ``batch`` from ``reference``."""
    return float(torch.linalg.vector_norm(batch_outputs(model, batch) - reference))


def _plan_content(plan) -> list:
    """What the selections applied so far changed, for a content key."""
    return [[repr(s.unit), s.keep, s.interpolation, list(s.interpolations or ())] for s in plan]


def _layer_report(selection: Selection) -> dict:
    """One row of ``layers_`` (for heads, widths count heads)."""
    unit = selection.unit
    if unit.kind == "heads":
        return {
            "producer": unit.producer,
            "consumer": unit.consumer,
            "kind": "heads",
            "producers": list(unit.producers),
            "consumers": [unit.consumer],
            "width_before": int(unit.n_heads),
            "width_after": int(selection.heads.size),
            "error": float(selection.error),
            "attention": unit.attention,
            "kv_heads_before": int(unit.n_kv_heads),
            "kv_heads_after": int(selection.kv_heads.size if unit.group_size > 1
                                  else selection.heads.size),
        }
    return {
        "producer": unit.producer,
        "consumer": unit.consumer,
        "kind": unit.kind,
        "producers": list(unit.producers),
        "consumers": [c.name for c in unit.consumers],
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
