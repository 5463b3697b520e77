"""NetworkCompressor: model-preserving compression of a torch model (its surface only).

``fit`` reads as a list of steps: check the parameters into one :class:`FitSettings` → the
data → a deep copy of the model → its units and blocks (``_discovery``) → FLOPs (``_flops``)
→ the plan (``_planner`` over one pass, or ``_blockwise`` block by block), applied to the copy
→ the report.
"""

from __future__ import annotations

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
from .._report import format_units_report
from .._validation import Interval, Options, SubsetOf, check_params
from . import _distributed, _hf_config, _intercept, _residual
from ._batches import Batches, example_inputs, model_device_dtype
from ._blocks import ExamplePass
from ._blockwise import blockwise_plan
from ._calibration import StatisticsCache, calibration_passes, fingerprint, model_fingerprint
from ._discovery import block_layout, find_all_units, require_units
from ._flops import count_flops, count_params
from ._model_checks import check_model
from ._objectives import (
    Calibration,
    Objective,
    Registered,
    calibration_names,
    objective_names,
)
from ._outputs import ModelOutputs, cached_outputs, collect_outputs, model_outputs
from ._planner import plan_one_pass
from ._settings import FitSettings
from ._unit_kinds import unit_kind

__all__ = ["NetworkCompressor"]

#: What ``prune`` may name: channel groups, attention heads, residual streams.
_STRUCTURES = ("channels", "heads", "residual")

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
        the uniform width, measured on the first calibration batch: one forward pass per
        unit). That allocation, the unweighted one, the largest uniform fraction of every unit
        within the budget (plain and with the leftover budget refilled) and, with channels and
        heads, the uniform cut of each kind alone are built from the statistics without the
        first calibration batch (one more statistics pass) and tried on that batch; the one
        whose outputs stay closest to the model's is kept (then fitted on every row), provided
        they are at least as close as the plain uniform cut's in distance and in direction
        (per sample, the cosine with the original output), so on those held-out rows it is
        never worse than keeping the same fraction of every unit by either measure. With a
        single batch the candidates are judged on it, in-sample.
    layers : "auto" or list of str or (str, str), default="auto"
        Restrict pruning to the groups of these producers (qualified names as in
        ``model.named_modules()``) or ``(producer, consumer)`` pairs.
    exclude : list of str, default=()
        Modules never to prune (with everything inside them).
    prune : {"channels", "heads", "residual"} or collection of them, \
            default=("channels", "heads")
        What to narrow. ``"channels"``: channel groups (neurons, conv channels, gated MLP
        widths). ``"heads"``: the heads of attention blocks (HF LLaMA/Qwen2/Mistral/ViT,
        BERT/RoBERTa, DistilBERT, GPT-2, BART/Marian/Whisper, CLIP; timm's ``Attention`` and
        Swin ``WindowAttention``; ``nn.MultiheadAttention``, which becomes
        ``skid.nn.PrunedMultiheadAttention`` when it loses heads; the table is in
        ``skid/nn/_attention_layouts.py``): whole heads are kept by a block ID of the output
        projection's input and the least-squares correction is folded into it; with
        grouped-query attention every key/value group keeps the same number of query heads,
        or whole groups go, whichever has the smaller error, so the model's own code runs.
        For heads, ``rank`` is the fraction of each key/value group's heads, ``width_before``
        and ``width_after`` count heads, and ``target_flops`` counts the attention scores.
        With ``calibration="corrective"`` the heads are chosen on the compressed model's
        output-projection input and ``T`` is fitted to the original model's.
        ``"residual"``: residual streams, one unit each. A pre-norm transformer's stream (its
        hidden size; HF LLaMA, Qwen2/3, Mistral, Gemma, GPT-2, ViT) is written by the
        embeddings and every layer adding into it and read through every norm: see
        ``stream``. ``rank`` is
        the fraction of the hidden size; ``tol`` bounds the relative error of the normalized
        stream summed over every norm's input; under ``target_flops`` the stream's width
        counts in every layer reading or writing it. Calibrated by a pass over the whole model
        (block-wise calibration runs the other units block by block and the stream in a pass
        of its own; with ``target_flops`` everything is one pass, ``blocks="auto"`` falling
        back to it), after the other units, so ``"sequential"``/``"corrective"`` compute it
        on the model compressed so far (a rotation has no ``T`` to fit to the original).
        Tied input/output embeddings are untied (with a warning). Streams that cannot be
        pruned are listed in ``skipped_`` with the reason (post-norm BERT, sandwich norms, a
        model whose output is the stream). A CNN stage's stream (ResNet/ResNeXt/RegNet basic
        and bottleneck blocks, MobileNetV2/EfficientNet projection streams), the channels
        between two downsamples, is one unit too: its writers (the stage's first conv or projection
        shortcut and every block's last conv, with their BatchNorms) keep the same channels
        ``J``, chosen by the joint ID of every reading of the stream, and each dense reader
        (every block's first conv, the next stage's projection and first conv, the pooled
        classifier) gets its own ``T``. Its width counts in every writer and reader for
        ``target_flops``; its error (what ``tol`` bounds and the budget weighs) is the root of
        the *sum* of its readings' squared relative errors: each reading feeds another block.
    stream : {"rotate", "select"}, default="rotate"
        How a transformer's stream is narrowed (a CNN stage's always keeps channels).
        ``"rotate"``: every norm's gain is folded into its readers and the stream is written
        in one orthogonal basis — the principal directions of the
        normalized stream, one Gram per norm input summed — whose last directions are sliced,
        each norm's readers reading the kept directions through their least-squares map
        (exact at full width: RMS norms commute with a rotation; LayerNorm streams are made
        zero-mean and kept in the zero-sum subspace, so the model's own LayerNorm still
        applies); no matrix is added on the shortcuts and the result is the model's own
        classes with a smaller hidden size. ``"select"``: the joint ID keeps stream
        coordinates (one kept set for every writer, a least-squares ``T`` and one RMS constant
        per norm; RMS-norm streams only).
    uniform : bool, default=False
        Give every repeated unit of a kind (every MLP, every attention block, the stream) one
        width, chosen by the same rule applied to the kind as a whole (``tol``: the widest
        any member needs; ``target_flops``: the budget over the kinds, each with the root
        mean square of its members' errors), so a Hugging Face model stays homogeneous: its
        ``config`` then carries ``hidden_size``, ``intermediate_size``,
        ``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim``, and
        ``compressed_model_.save_pretrained(dir)`` reloads with ``from_pretrained(dir)``
        (a warning says when the config cannot describe the widths). The stream's width is
        written into the config either way.
    objective : {"activations", "outputs"} or Objective, default="activations"
        What the kept channels must reconstruct (a registered name or an
        :class:`skid.nn.Objective`, e.g. ``OutputsObjective(pivots="greedy")``).
        ``"activations"`` (the paper): the consumer's input ``Z``; ``tol`` and the reported
        errors are ``‖Z − Z_J T‖_F / ‖Z‖_F``.
        ``"outputs"``: what the consumer computes from it, ``Z Wᵀ`` (its weights enter the
        pivoting: columns are scaled by the norms of the consumer weights that read them);
        ``tol`` and the errors are then ``‖(Z − Z_J T) Wᵀ‖_F / ‖Z Wᵀ‖_F`` (for convolutions
        and flattened inputs, without the cross terms between kernel positions). ``T`` is
        the least-squares fit on ``Z`` either way. With ``calibration="corrective"`` the
        pivots come from the compressed model's ``Z_c`` scaled by those weight norms ``D``,
        ``T`` is the least-squares fit of the original's ``Z_o``, and ``tol`` and the errors
        are ``‖(Z_o − Z_c[:, J] T) D‖_F / ‖Z_o D‖_F``.
    calibration : {"original", "sequential", "corrective"} or Calibration, default="original"
        ``"original"``: every unit's ID from the original model's activations, one pass.
        ``"sequential"``: units in forward order, each from the model compressed so far (one
        pass per unit; with ``target_flops`` the widths come from a first, original pass).
        ``"corrective"``: units in forward order; channels chosen from the compressed model's
        consumer input ``Z_c`` and ``T`` fitted by least squares to the *original* model's
        ``Z_o`` (``min ‖Z_o − Z_c[:, J] T‖_F``), so each consumer sees what the original fed
        it, upstream errors included (``CorrectiveCalibration(selection="greedy")`` chooses
        ``J`` greedily on the cross statistic instead). Two truncated passes per unit (the
        original and the compressed model on the same batches; one for the first unit) and a
        second copy of the model on ``device``. Widths as ``"sequential"``; ``tol`` is then
        met against ``Z_o`` (a unit whose upstream error alone exceeds it keeps its full width).
    blocks : "auto", str or None, default="auto"
        Block-wise calibration. ``"auto"`` finds the longest ``nn.ModuleList`` whose members
        run one after another on the previous one's output (HF decoder/encoder layers); a
        qualified name picks that list (an error if it does not qualify); None turns it off.
        The blocks are then calibrated one at a time: the inputs of the next block are cached
        for every calibration batch (on the host, or as files under ``memory``), only the
        current block's statistics are held, and with ``device`` set only the current block
        (and the code around the blocks) is moved there, so a model larger than the device can
        be compressed. (Without ``device`` and ``memory``, the ``"original"`` calibration and
        the FLOP budget's walks run consecutive blocks whose statistics stay under 64 MiB
        together in one pass: a small model's blocks then cost one pass, the same
        statistics.) Every ``calibration`` gives its one-pass result (``"corrective"`` walks
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
        ``c ← c + W b`` (a consumer without a bias gets one): what FLAP's bias compensation
        buys, at every width, for one bias vector per consumer; exact at full width. For a
        convolution with zero padding the constant is exact away from the borders. Groups
        read as several tensors or by grouped convolutions keep no constant. A Hugging Face
        model gets its config's ``mlp_bias``/``attention_bias`` set (and zero biases in the
        other layers of those families) so that ``save_pretrained`` output reloads; a
        consumer no config flag governs (Qwen2's MLP, say) is refused with the reason. Off by
        default: see benchmarks/README.md (bench_peers.py) for where it helps.
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
        One per pruned unit: ``kind`` (``"channels"``, ``"heads"`` or ``"residual"``),
        ``producers`` and ``consumers`` (lists of qualified names; a stream's writers and
        readers), ``producer`` and ``consumer`` (the first of each), ``width_before``,
        ``width_after``, ``error``; a CNN stage's row adds ``passthroughs`` (the per-channel
        modules sliced with it), a transformer stream's ``norms``, ``stream``, ``norm`` and
        ``untied``. ``pandas.DataFrame(layers_)`` is the report.
        ``error`` is the relative error on the calibration data of what the consumers see:
        the ID error ``‖Z − Z[:, J] T‖_F / ‖Z‖_F`` of their input ``Z`` in the model it was
        calibrated on (the original, or for ``"sequential"`` the model compressed so far; for
        consumers reading different tensors, the root mean square over them, the root of
        their sum for a residual stream); for
        ``"corrective"``, ``‖Z_o − Z_c[:, J] T‖_F / ‖Z_o‖_F`` against the original model's
        input ``Z_o``, upstream units' errors included; for ``objective="outputs"``, the same
        for the consumer's output ``Z Wᵀ``.
    plan_ : Plan
        The applied plan: ``plan_.selections`` holds one selection per unit in forward
        order (``unit``, ``keep``, ``interpolation`` — block-wise, emptied once folded —
        and ``error``; heads: ``heads``, ``kv_heads``), ``plan_.layers`` is ``layers_``.
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
        "stream": [Options(("rotate", "select"))],
        "uniform": [bool],
        "objective": [Registered(objective_names, Objective)],
        "calibration": [Registered(calibration_names, Calibration)],
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
        stream="rotate",
        uniform=False,
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
        self.stream = stream
        self.uniform = uniform
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
        settings = self._check_params()
        with _distributed.active(_distributed.resolve(self.process_group)):
            _distributed.check_agreement(model, self.get_params(deep=False))  # before any sum
            return self._fit(model, X, settings)

    def _fit(self, model, X, settings: FitSettings):
        """The steps of ``fit`` once the arguments are checked (within the data-parallel group,
        if any): data → working copy → units → blocks → FLOPs → plan → report."""
        home, dtype = model_device_dtype(model)
        device = home if settings.device is None else settings.device
        batches = self._batches(X, settings)
        # Block-wise, the model waits on its own device and each block moves for its turn.
        stage = home if settings.blocks is not None else device
        work = _working_copy(model, stage)
        caches = _hf_config.switch_off_kv_cache(work)  # no pass of fit reads one
        example = example_inputs(batches.first, stage, dtype)
        # the finders' passes on the example also record what the block layout reads
        with ExamplePass(work, settings.blocks) as example_pass:
            units, skipped = find_all_units(work, example, settings)
        self.skipped_ = [{"producer": s.producer, "reason": s.reason} for s in skipped]
        require_units(work, units, skipped, self.prune, settings.verbose)
        layout = block_layout(work, example, settings, units, example_pass.calls())
        self.blocks_ = None if layout is None else layout.name
        if layout is not None:
            batches.make_reusable()  # several passes over the data
        elif stage != device:
            work.to(device)
            example = example_inputs(batches.first, device, dtype)
        self.method_ = settings.method
        own = [m for u in units for m in unit_kind(u).own_flops(u)]  # e.g. attention scores
        flops_before, module_flops = count_flops(work, *example, own=own)
        params_before = count_params(work)
        passes_before = calibration_passes()
        # the model's weights and the code it runs, keyed once per fit
        self._model_key = None if self.memory is None else model_fingerprint(work, *example)
        key = None if self.memory is None else self._cache_key(batches, units, settings)
        cache = StatisticsCache(self.memory)
        flops_info = (module_flops, flops_before)
        with _intercept.fitting_intercept(settings.fit_intercept):
            bias_flags = _intercept.hf_bias_flags(work, _intercept.new_biases(work, units))
            if layout is None:
                plan = plan_one_pass(settings, work, units, batches, key, cache, flops_info)
            elif any(_residual.is_residual(u) for u in units):
                plan = _residual.blockwise(settings, work, units, layout, batches, key, cache,
                                           flops_info, stage)
            else:
                plan = blockwise_plan(settings, work, units, layout, batches, key, cache,
                                      flops_info, stage)
        _intercept.set_hf_bias_flags(work, bias_flags)
        _hf_config.update(work, plan, uniform=settings.uniform)
        self.plan_ = plan
        self.n_calibration_samples_ = plan.n_samples
        self.n_calibration_passes_ = calibration_passes() - passes_before
        self.flops_ = {"before": int(flops_before), "after": int(count_flops(work, *example)[0])}
        self.params_ = {"before": int(params_before), "after": int(count_params(work))}
        _hf_config.switch_on_kv_cache(caches)
        self.layers_ = plan.layers
        self.compressed_model_ = work.to(home).eval()
        self._original_model = model
        self._settings = settings
        return self

    def _batches(self, X, settings) -> Batches:
        """The calibration batches; the first is the same on every rank."""
        multi_pass = self.memory is not None or settings.calibration.follows_compression
        sharded = _distributed.current() is not None
        batches = Batches(X, self.batch_size, reusable=multi_pass, allow_empty=sharded)
        batches.first = _distributed.first_batch(batches.first)
        return batches

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

    def _check_params(self) -> FitSettings:
        """Check the parameters (``rank`` and ``target_flops`` exclude each other) and
        resolve them into the fit's settings."""
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
        return FitSettings.from_params(self.get_params(deep=False))

    def _cache_key(self, batches: Batches, units, settings) -> str:
        """Content key of the statistics: the model's key, the data, the units and route."""
        return fingerprint(
            self._model_key,
            _distributed.agreed_key(batches.fingerprint()),
            [repr(u) for u in units],
            settings.method,
            settings.precision,
            settings.fit_intercept,
        )

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
            A Hugging Face ``ModelOutput`` is read by its ``logits``, another tuple or
            dict-like output by its first tensor. :meth:`outputs` gives them per batch,
            unflattened ((n, seq, vocab) logits, (n, C, H, W) maps).
        """
        check_is_fitted(self, "compressed_model_")
        return model_outputs(self.compressed_model_, X, self.batch_size)

    def fit_transform(self, *args, **kwargs) -> np.ndarray:
        """``fit(...)`` then ``transform(X)`` on the calibration data."""
        model, X = self._fit_arguments(args, dict(kwargs))
        return self.fit(model, X).transform(X)

    def predict(self, X) -> np.ndarray:
        """Top-1 class of the compressed model: argmax of :meth:`transform`, shape (n_samples,).

        For (n, classes) outputs; per position (tokens, pixels) the metrics use
        :meth:`outputs`.
        """
        return self.transform(X).argmax(axis=1)

    def score(self, X, y=None) -> float:
        """Top-1 agreement with the original model if ``y`` is None, else accuracy on ``y``.

        Both compare per position along the class axis (see :func:`skid.metrics.agreement`):
        per token for (n, seq, vocab) logits, per pixel for (n, C, H, W) maps.
        """
        if y is None:
            return metrics.agreement(self, X)
        return metrics.accuracy(self, X, y)

    def outputs(self, X, *, original=False) -> ModelOutputs:
        """The compressed (or the original) model's outputs on ``X``, per batch, unflattened.

        What :mod:`skid.metrics` compares: each batch's output as the model returns it (a
        Hugging Face ``ModelOutput``'s ``logits``), with the batch's ``attention_mask``,
        ``labels`` and token ids. :meth:`transform` is the same values flattened.

        Parameters
        ----------
        X : tensor, ndarray, dict of those, or iterable of batches
            Batched like the calibration data.
        original : bool, default=False
            The uncompressed model's outputs instead. With ``memory`` they are cached by
            content, so the candidates of a grid search (clones, one per setting) run the
            original model over a test fold once.

        Returns
        -------
        skid.nn.ModelOutputs
            ``values``, ``masks``, ``labels``, ``tokens``: one entry per batch;
            ``flat()`` gives the (n_samples, n_outputs) array.
        """
        check_is_fitted(self, "compressed_model_")
        if not original:
            return collect_outputs(self.compressed_model_, X, self.batch_size)
        return cached_outputs(self._original_model, X, self.batch_size, self.memory,
                              getattr(self, "_model_key", None))

    def report(self) -> str:
        """The per-unit report as a text table: the one ``skid compress`` prints.

        One row per pruned unit of ``layers_`` (its kind, producer, consumer, width before →
        after, the fraction kept, the ID error), then the FLOPs and parameters kept.
        ``print(nc.report())`` to read it; ``pandas.DataFrame(nc.layers_)`` for a frame.
        """
        check_is_fitted(self, "compressed_model_")
        return format_units_report(self.layers_, self.flops_, self.params_)

    def _original_outputs(self, X) -> np.ndarray:
        """The original model's outputs on ``X``, flattened like :meth:`transform`."""
        return self.outputs(X, original=True).flat()


# ---------------------------------------------------------------------------------- helpers


def _working_copy(model: nn.Module, device) -> nn.Module:
    """A deep copy of ``model`` on ``device``, in eval mode (the caller's model is untouched)."""
    work = copy.deepcopy(model)
    return work.to(device).eval()
