"""``fit_intercept=True``: the ID with a constant column, its constant folded into a bias.

The fit ``Z ≈ Z[:, J] T + 1 bᵀ`` is the ID of the *centred* activations ``Z − 1 μᵀ``
(``J`` and ``T`` from their Gram, the covariance) with ``b = μ − Tᵀ μ_J``: the least-squares
fit with an intercept is the fit of the centred data. A consumer computing ``W z + c`` then
computes ``W Tᵀ z_J + (W b + c)``, so ``T`` folds into its weight as usual and ``W b`` is
added to its bias (created if it has none). At full width ``T`` is the identity and ``b = 0``.

The statistic carries the constant as an extra *first* column of the consumer's input:
the Gram ``[[n, sᵀ], [s, G]]`` gives the centred Gram ``G − s sᵀ / n`` and ``μ = s / n``;
the TSQR factor of ``[1 | Z]`` holds ``√n μᵀ`` in its first row and, below, the triangular
factor of the centred ``Z`` itself (no subtraction: accurate to the data's rounding).
Errors stay relative to ``‖Z‖_F``, so ``tol`` means what it means without the intercept.

While a fit runs with the intercept, :func:`active` is True (a context variable): the
calibration hooks then append the constant column to every unit :func:`applies` to.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch

from .._linalg import PivotedFactorization, factorize_gram, factorize_triangular

__all__ = [
    "InterceptFactorization",
    "active",
    "applies",
    "centred_gram",
    "fitting_intercept",
    "hf_bias_flags",
    "intercept",
    "new_biases",
    "set_hf_bias_flags",
    "with_constant",
]

_ACTIVE = contextvars.ContextVar("skid_fit_intercept", default=False)


@contextlib.contextmanager
def fitting_intercept(flag: bool = True):
    """Statistics gathered inside this block carry the constant column (when ``flag``)."""
    token = _ACTIVE.set(bool(flag))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether the fit that is running asks for an intercept."""
    return _ACTIVE.get()


def applies(unit) -> bool:
    """Units that get an intercept: read as one tensor, not by a grouped convolution (their
    joint or block-diagonal statistics have no single centred fit)."""
    return active() and unit.n_readings == 1 and unit.blocks == 1


def with_constant(Z: torch.Tensor) -> torch.Tensor:
    """``[1 | Z]``: the rows with a constant first column (same dtype and device)."""
    return torch.cat([torch.ones_like(Z[:, :1]), Z], dim=1)


# ------------------------------------------------------------------------------ statistics


def centred_gram(gram: np.ndarray):
    """``(G − s sᵀ / n, μ, ‖Z‖_F²)`` from the Gram of ``[1 | Z]`` (any positive scale)."""
    gram = np.asarray(gram, dtype=np.float64)
    n, s = gram[0, 0], gram[1:, 0]
    if n <= 0:
        raise ValueError("No rows reached the statistic.")
    mean = s / n
    centred = gram[1:, 1:] - np.outer(s, mean)
    centred = (centred + centred.T) / 2  # rounding of the outer product, not asymmetry
    return centred, mean, float(np.trace(gram[1:, 1:]))


def _centred_triangular(R: np.ndarray):
    """``(R22, μ, ‖Z‖_F²)`` from the TSQR factor of ``[1 | Z]``: ``R22`` is the triangular
    factor of the centred ``Z``, the first row ``√n (1, μᵀ)`` (signs as QR left them)."""
    R = np.asarray(R, dtype=np.float64)
    root = R[0, 0]
    if root == 0:
        raise ValueError("No rows reached the statistic.")
    mean = R[0, 1:] / root
    return R[1:, 1:], mean, float(np.sum(R[:, 1:] ** 2))


class InterceptFactorization:
    """A column ID of the centred activations, the means, and errors relative to ``‖Z‖``.

    Parameters
    ----------
    fac : PivotedFactorization
        Of the centred ``Z − 1 μᵀ``.
    mean : ndarray of shape (m,)
        Column means ``μ``.
    sq_norm : float
        ``‖Z‖_F²`` of the uncentred rows (errors are relative to it).

    Attributes
    ----------
    errors : ndarray of shape (m + 1,)
        ``‖Z − Z[:, J_k] T_k − 1 bᵀ‖_F / ‖Z‖_F`` keeping the first k pivots.
    """

    def __init__(self, fac: PivotedFactorization, mean, sq_norm: float, centred_sq: float):
        self.fac, self.mean = fac, np.asarray(mean, dtype=np.float64)
        self.total_sq_norm, self.centred_sq_norm = float(sq_norm), float(centred_sq)
        self.scale = float(np.sqrt(max(centred_sq, 0.0) / sq_norm)) if sq_norm > 0 else 0.0
        self.errors = fac.errors * self.scale

    @classmethod
    def from_accumulator(cls, accumulator) -> InterceptFactorization:
        """From a Gram or TSQR accumulator of ``[1 | Z]`` (any power-of-two scale)."""
        from .. import _array
        from .._linalg import GramAccumulator

        if isinstance(accumulator, GramAccumulator):
            eps = float(np.finfo(np.float32).eps) if accumulator.float32_products else None
            centred, mean, sq_norm = centred_gram(accumulator.host_gram())
            centred_sq = float(np.trace(centred))
            fac = factorize_gram(centred, accumulator.n_samples, eps)
        else:
            R = np.asarray(_array.to_numpy(accumulator.R), dtype=np.float64)
            R22, mean, sq_norm = _centred_triangular(R)
            centred_sq = float(np.sum(R22**2))
            fac = factorize_triangular(R22, float(np.finfo(accumulator.dtype).eps),
                                       accumulator.n_samples)
        return cls(fac, mean, sq_norm, centred_sq)

    def for_outputs(self, rule) -> InterceptFactorization:
        """The same means around a re-pivoted factorization (``rule(fac) -> fac``).

        For ``objective="outputs"``: the errors are then the centred output errors times the
        activations' ``‖Z − 1μᵀ‖ / ‖Z‖`` (the outputs' own ratio is not in the statistic), an
        approximation of the error relative to the uncentred outputs.
        """
        return InterceptFactorization(rule(self.fac), self.mean, self.total_sq_norm,
                                      self.centred_sq_norm)

    @property
    def n_features(self) -> int:
        return self.fac.n_features

    @property
    def n_samples(self):
        return self.fac.n_samples

    @property
    def perm(self) -> np.ndarray:
        return self.fac.perm

    @property
    def means(self) -> tuple:
        """``(μ_c, μ_o)`` of the compressed and the original input: the same here."""
        return self.mean, self.mean

    def select(self, k: int):
        """Kept channels (pivot order) and ``T`` (k × m), as the plain ID's."""
        return self.fac.select(k)


def intercept(fac, columns, T):
    """``b = μ_o − Tᵀ μ_c[columns]`` for a factorization with ``means``, else None."""
    means = getattr(fac, "means", None)
    if means is None:
        return None
    mean_c, mean_o = means
    return np.asarray(mean_o - np.asarray(T, dtype=np.float64).T @ mean_c[np.asarray(columns)])


def new_biases(work, units) -> list:
    """Consumers that the fit's intercept gives a bias they do not have yet."""
    names = [c.name for u in units if applies(u) for c in u.consumers]
    return [n for n in names if getattr(work.get_submodule(n), "bias", None) is None]


# -------------------------------------------------------------------- Hugging Face configs

#: Config flags that give every module of a family a bias, by the attribute under which the
#: family sits in its block (``layers.0.mlp.down_proj`` → ``mlp`` → ``mlp_bias``).
_HF_FLAGS = {"mlp": "mlp_bias", "feed_forward": "mlp_bias", "self_attn": "attention_bias"}


def hf_bias_flags(model, consumers) -> dict:
    """The Hugging Face config flags under which the consumers' new biases reload.

    ``consumers`` names the modules that were given a bias. Returns ``{flag: [family module
    names]}``; raises ValueError naming the module when its class cannot hold a bias after
    ``from_pretrained`` (no flag in the config governs it). Not a Hugging Face model: ``{}``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not consumers:
        return {}
    flags = {}
    for name in consumers:
        parent, _, _ = name.rpartition(".")
        family = parent.rpartition(".")[2]
        flag = _HF_FLAGS.get(family)
        if flag is None or not isinstance(getattr(config, flag, None), bool):
            raise ValueError(
                f"fit_intercept=True gives {name!r} a bias, but {type(model).__name__}'s "
                f"config has no flag that makes that module hold one "
                f"({flag or 'mlp_bias/attention_bias'}), so the model would not reload with "
                "from_pretrained. Use fit_intercept=False for this model.")
        flags.setdefault(flag, set()).add(type(model.get_submodule(parent)))
    return flags


def set_hf_bias_flags(model, flags: dict) -> None:
    """Set the flags on ``model.config`` and give every Linear of the flagged families a zero
    bias where it has none, so the state dict matches what ``from_pretrained`` builds."""
    for flag, families in flags.items():
        setattr(model.config, flag, True)
        for module in model.modules():
            if not isinstance(module, tuple(families)):
                continue
            for child in module.children():
                if isinstance(child, torch.nn.Linear) and child.bias is None:
                    weight = child.weight
                    child.bias = torch.nn.Parameter(
                        torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                        requires_grad=weight.requires_grad)
