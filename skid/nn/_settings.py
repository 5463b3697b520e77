"""The settings of one ``fit``, resolved once into a frozen record passed down to the planner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _policy
from ._objectives import Calibration, Objective, calibration_for, objective_for

__all__ = ["FitSettings"]


@dataclass(frozen=True)
class FitSettings:
    """What a fit was asked for, with ``"auto"`` choices resolved.

    Built by :meth:`from_params` from the estimator's parameters at the start of ``fit``;
    nothing below ``fit`` reads the estimator.

    Attributes
    ----------
    tol, rank, target_flops : float or None
        The width rule (``rank``/``target_flops`` replace ``tol``).
    objective : Objective
        What the kept channels must reconstruct (:mod:`skid.nn._objectives`).
    calibration : Calibration
        Which model the statistics come from and what ``T`` is fitted to.
    method : {"gram", "qr"}
        The route every unit starts on (``method="auto"`` resolved).
    auto : bool
        ``method="auto"``: a route re-check may go to QR at once.
    precision : {"native", "float64"}
        Products of the Gram route.
    prune : frozenset of str
    layers, exclude, blocks :
        As given to the estimator.
    device : torch.device or None
        Where calibration runs (None: the model's device).
    verbose : bool
    stream : {"rotate", "select"}
        How a residual stream is narrowed (``prune="residual"``).
    uniform : bool
        One width per kind of repeated unit.
    fit_intercept : bool
        ``T`` with a constant column, folded into the consumers' biases
        (:mod:`skid.nn._intercept`).
    """

    tol: float
    rank: float | None
    target_flops: float | None
    objective: Objective
    calibration: Calibration
    method: str
    auto: bool
    precision: str
    prune: frozenset
    layers: object
    exclude: object
    blocks: str | None
    device: torch.device | None
    verbose: bool
    stream: str = "rotate"
    uniform: bool = False
    fit_intercept: bool = False

    @classmethod
    def from_params(cls, params: dict) -> FitSettings:
        """Resolve the estimator's (already checked) parameters."""
        tol = params["tol"]
        request = tol if params["rank"] is None and params["target_flops"] is None else None
        method = params["method"]
        prune = params["prune"]
        device = params["device"]
        return cls(
            tol=tol,
            rank=params["rank"],
            target_flops=params["target_flops"],
            objective=objective_for(params["objective"]),
            calibration=calibration_for(params["calibration"]),
            method=_policy.exact_route(request) if method == "auto" else method,
            auto=method == "auto",
            # widths from rank/target_flops start on float32 products and are re-checked;
            # a float64 model's activations are multiplied in float64 either way
            precision=_policy.gram_precision(float32_data=True, tol=request,
                                             width_request=request is None),
            prune=frozenset({prune} if isinstance(prune, str) else prune),
            layers=params["layers"],
            exclude=params["exclude"],
            blocks=params["blocks"],
            device=None if device is None else torch.device(device),
            verbose=bool(params["verbose"]),
            stream=params.get("stream", "rotate"),
            uniform=bool(params.get("uniform", False)),
            fit_intercept=bool(params.get("fit_intercept", False)),
        )

    @property
    def tol_request(self) -> float | None:
        """``tol`` when it decides the widths, None when ``rank`` or ``target_flops`` does."""
        return self.tol if self.rank is None and self.target_flops is None else None
