"""InterpolativeDecomposition: the column ID as a scikit-learn transformer."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _array, _linalg, _policy
from ._validation import Interval, Options, check_params

__all__ = ["InterpolativeDecomposition", "interp_decomp"]


class InterpolativeDecomposition(TransformerMixin, BaseEstimator):
    """Column interpolative decomposition ``X ≈ X[:, J] @ T``.

    Selects ``rank_`` columns ``J`` of the data (in pivot order) and an interpolation matrix
    ``T`` that reconstructs every column from them; ``T`` is the identity on the selected
    columns. The columns are real features of the data, so ``transform`` is a feature
    selection and ``inverse_transform`` an interpolation.

    Parameters
    ----------
    rank : int or float, default=None
        Columns to keep: an int in ``[1, min(n_samples, n_features)]``, or a float in (0, 1),
        the fraction of the features (rounded up, ignoring rounding noise: 0.28 of 25 is 7, as
        in ``NetworkCompressor``; at most ``min(n_samples, n_features)``).
    tol : float, default=None
        Keep the fewest columns whose relative Frobenius error on the fitted data,
        ``‖X − X[:, J] T‖_F / ‖X‖_F``, is at most ``tol`` (in [0, 1)). With both ``rank``
        and ``tol`` None the numerical rank is kept (pivots ``|R_kk| > max(n, m) · eps ·
        |R_00|``, eps of the data's dtype). Giving both is an error.
    method : {"auto", "gram", "qr", "randomized"}, default="auto"
        ``"gram"``: pivoted Cholesky of the float64 Gram matrix ``XᵀX`` accumulated block by
        block, the fastest exact route, accurate down to relative errors of about 1e-7.
        ``"qr"``: column-pivoted QR of a streamed tall-skinny R factor, accurate to the
        rounding of the data's dtype, 2-4× the work of ``"gram"``. ``"randomized"``: pivots
        from a Gaussian sketch of ``rank + 10`` rows, then the least-squares T from a second
        pass; needs ``rank``, saves work when the rank is a small part of many features, and
        cannot stream (no ``partial_fit``, nor after a ``fit`` that took this route).
        ``"auto"`` chooses by the rule in Notes; the choice is stored in ``method_``.
    backend : {"auto", "numpy", "cupy"}, default="auto"
        Where the passes over the data run. ``"auto"`` follows the input: NumPy arrays and CPU
        torch tensors on the CPU, CuPy arrays and CUDA torch tensors on their GPU, results in
        the input's array type. ``"numpy"`` copies GPU input to the host; ``"cupy"`` moves
        host input to the current GPU (needs CuPy). Only the m × m pivoting step runs on the
        host.
    random_state : int, RandomState instance or None, default=None
        Seeds the sketch of ``method="randomized"``.

    Attributes
    ----------
    selected_features_ : ndarray of shape (rank_,)
        Indices of the selected columns, in pivot order.
    interpolation_matrix_ : array of shape (rank_, n_features_in_)
        T, in the fitted input's array type and floating dtype (float32 stays float32).
        ``interpolation_matrix_[:, selected_features_]`` is the identity.
    rank_ : int
        Number of selected columns.
    error_ : float
        Relative Frobenius error ``‖X − X[:, J] T‖_F / ‖X‖_F`` on the fitted data (0 for a
        zero matrix).
    method_ : str
        The route that ran: ``"gram"``, ``"qr"`` or ``"randomized"``.
    n_samples_seen_ : int
        Rows seen by ``fit`` or all ``partial_fit`` calls so far.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Feature names, when fitted on a DataFrame with string column names.

    See Also
    --------
    interp_decomp : The same decomposition as a function of a matrix.
    scipy.linalg.interpolative.interp_decomp : SciPy's ID (dense, in memory, slower).
    sklearn.decomposition.TruncatedSVD : Optimal low-rank approximation, not by columns.

    Notes
    -----
    With a column-pivoted triangular factor ``X P = Q [[R11, R12], [0, R22]]`` the ID keeps
    the first k pivots ``J`` and ``T = [I, R11⁻¹ R12] Pᵀ``; its error is exactly
    ``‖X − X[:, J] T‖_F = ‖R22‖_F`` for every k, so ``tol`` picks the smallest k without
    trying ranks one by one. Both deterministic routes stream row blocks into a statistic of
    size m × m (the Gram matrix or the R factor), so ``fit`` and ``partial_fit`` share one
    code path, and memory does not grow with n_samples.

    Rule of ``method="auto"`` (shared with ``NetworkCompressor``, in ``skid._policy``):
    ``"randomized"`` in ``fit`` when ``rank`` is given, ``n_features >= 1024`` and ``rank <=
    n_features / 8``; else ``"qr"`` when ``tol`` is below 1e-4, or when neither ``rank`` nor
    ``tol`` is given and the data are float64 (the numerical rank needs full accuracy); else
    ``"gram"``. When ``"gram"`` ran for a given ``rank`` and the error there is below 1e-4,
    or when the rank goes past the pivots that stand clear of the Gram's rounding while the
    rows would allow more, ``fit`` recomputes with ``"qr"`` (the Gram route does not resolve
    those); ``partial_fit`` cannot revisit the data.

    The Gram route never trusts more pivots than rows seen, nor a pivot below the Gram's own
    rounding (``m · eps · max diag``, eps of the products); columns kept past those are kept
    as they are (identity rows of T). Data of any finite magnitude are handled: a block whose
    squares would overflow or underflow is scaled by a power of two (exact) before its
    statistic is formed, and a block with NaN/Inf is refused before it touches the statistic.

    A Dask array is reduced on its scheduler (a ``dask.distributed`` cluster included): each
    row chunk becomes its own m × m statistic, and the statistics are merged up a tree, so X is
    never materialised. T is then a NumPy array, and ``transform``/``inverse_transform`` of a
    Dask array are lazy Dask arrays. ``"randomized"`` does not run on Dask arrays.

    float32 data are never copied to float64 whole. The Gram route multiplies float32 blocks
    in float32 (summing the blocks in float64) when ``tol >= 1e-3``, or in ``fit`` for a
    ``rank`` whose error turns out to be at least 1e-3 (else ``fit`` redoes it in float64
    products, as it does for a width past the pivots clear of float32 rounding): measured on
    100,000 × 512 float32 data the error estimate of float32 products is off by 0.15 % at an
    error of 2e-3. Otherwise each block is upcast to float64 before its product.

    References
    ----------
    .. [1] J. Chee, M. Flynn, A. Damle, C. De Sa. "Model Preserving Compression for Neural
       Networks". NeurIPS 2022.
    .. [2] H. Cheng, Z. Gimbutas, P.-G. Martinsson, V. Rokhlin. "On the compression of low
       rank matrices". SIAM J. Sci. Comput. 26(4), 2005.
    .. [3] P.-G. Martinsson, J. A. Tropp. "Randomized numerical linear algebra: foundations
       and algorithms". Acta Numerica 29, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from skid import InterpolativeDecomposition
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((100, 3)) @ rng.standard_normal((3, 8))
    >>> id_ = InterpolativeDecomposition(tol=1e-6).fit(X)
    >>> id_.rank_
    3
    >>> bool(np.allclose(id_.inverse_transform(id_.transform(X)), X))
    True
    >>> round(id_.score(X), 6)
    1.0
    """

    _parameter_constraints = {
        "rank": [
            None,
            Interval(numbers.Integral, 1, None),
            Interval(numbers.Real, 0, 1, "neither"),
        ],
        "tol": [None, Interval(numbers.Real, 0, 1, "left")],
        "method": [Options(("auto", "gram", "qr", "randomized"))],
        "backend": [Options(("auto", "numpy", "cupy"))],
        "random_state": [None, numbers.Integral, np.random.RandomState],
    }

    def __init__(self, rank=None, *, tol=None, method="auto", backend="auto", random_state=None):
        self.rank = rank
        self.tol = tol
        self.method = method
        self.backend = backend
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None):
        """Select the columns and compute T from all of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            NumPy array, DataFrame, CuPy array, torch tensor, or Dask array (reduced chunk by
            chunk on its scheduler, never materialised).
        y : None
            Ignored.

        Returns
        -------
        self : InterpolativeDecomposition
        """
        self._check_params()
        # Non-finite data show up in the statistic (checked when it is factorized), so fit
        # spares the extra pass; partial_fit checks, not to poison what it has accumulated.
        X = self._check_data(X, reset=True, finite=False)
        k = self._requested_rank(X.shape)
        self.method_ = self._resolve_method(X, k, streaming=False)
        if self.method_ == "randomized" and _array.array_kind(X) == "dask":
            raise ValueError(
                "method='randomized' does not run on Dask arrays; use method='gram' or 'qr' "
                "(both reduce the data blockwise on the Dask scheduler)."
            )
        if self.method_ == "randomized":
            seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
            rng = np.random.default_rng(seed)
            selected, T, error = _linalg.randomized_factorization(X, k, rng)
            self._set_result(X, selected, T, error)
            self._accumulator = None  # nothing to stream on from (partial_fit says so)
        else:
            self._gram_precision = self._resolve_precision(X, streaming=False)
            fac = self._finalize(X, self._accumulate(X, self._new_accumulator()))
            self._refit_if_inaccurate(X, fac)
        self.n_samples_seen_ = X.shape[0]
        return self

    def partial_fit(self, X, y=None):
        """Add a block of rows; the result equals ``fit`` on all blocks stacked.

        Memory stays m × m however many rows are streamed; each call refactorizes that
        statistic (O(m³)), so prefer blocks of many rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A block of rows.
        y : None
            Ignored.

        Returns
        -------
        self : InterpolativeDecomposition
        """
        first = not hasattr(self, "_accumulator")
        if first:
            self._check_params()
            if self.method == "randomized":
                raise ValueError(
                    "method='randomized' needs two passes over the data and cannot stream; "
                    "use fit, or method='auto', 'gram' or 'qr' with partial_fit."
                )
        elif self._accumulator is None:
            raise ValueError(
                "partial_fit cannot continue this fit: it took the randomized route "
                "(method_='randomized'), which keeps no statistic of the rows to add to. "
                "Refit with fit on all the rows, or stream from the start with partial_fit "
                "(method='auto', 'gram' or 'qr') on a new estimator."
            )
        X = self._check_data(X, reset=first)
        if first:
            self.method_ = self._resolve_method(X, self._requested_rank(X.shape, True), True)
            self._gram_precision = self._resolve_precision(X, streaming=True)
        accumulator = self._new_accumulator() if first else self._accumulator
        self._finalize(X, self._accumulate(X, accumulator, check_finite=True))
        self.n_samples_seen_ = accumulator.n_samples
        return self

    def _new_accumulator(self):
        if self.method_ == "gram":
            return _linalg.GramAccumulator(self._gram_precision)
        return _linalg.QRAccumulator()

    def _accumulate(self, X, accumulator, check_finite=False):
        """Add the rows of X to ``accumulator``; a Dask array is reduced on its scheduler."""
        if _array.array_kind(X) != "dask":
            return accumulator.update(X)
        from . import _dask

        template = self._new_accumulator()
        return accumulator.merge(_dask.accumulate(X, template, check_finite=check_finite))

    def _finalize(self, X, accumulator):
        """Factorize the statistic, choose k, set T and the fitted attributes; return the factors.

        Nothing is set when the factorization fails (non-finite data in ``fit``).
        """
        n_seen = accumulator.n_samples
        rank = self._requested_rank((n_seen, X.shape[1]), streaming=True)
        # The width rule is known before the factorization: only the pivots it needs.
        fac = accumulator.factorize(rank=rank, tol=self.tol)
        self._accumulator = accumulator
        if self.tol is not None:
            k = fac.rank_for_tol(self.tol)
        elif rank is not None:
            k = rank
        else:
            eps = np.finfo(_array.float_dtype_for(X)).eps
            k = fac.numerical_rank(max(n_seen, X.shape[1]) * eps)
        selected, T = fac.select(k)
        self._set_result(X, selected, T, float(fac.errors[k]))
        return fac

    def _set_result(self, X, selected, T, error):
        self.selected_features_ = np.asarray(selected, dtype=np.int64)
        self.interpolation_matrix_ = _array.from_numpy(T, X, _array.float_dtype_for(X))
        self.rank_ = int(self.selected_features_.size)
        self.error_ = float(error)

    def _refit_if_inaccurate(self, X, fac):
        """Redo ``fit`` on a finer route while the one that ran does not resolve the result.

        The rule is :func:`skid._policy.finer_route`: float32 products → float64 products
        (any ``method`` that ran ``"gram"``) → QR (only ``method="auto"``), when a ``rank``'s
        error lands below what the route resolves, or when the width goes past the pivots
        clear of the statistic's rounding. ``partial_fit`` cannot revisit the data.
        """
        while self.method_ == "gram":
            finer = _policy.finer_route(
                fac,
                self.rank_,
                method=self.method_,
                precision=self._gram_precision,
                auto=self.method == "auto",
                width_request=self.rank is not None,
            )
            if finer is None:
                return
            self.method_, self._gram_precision = finer
            fac = self._finalize(X, self._accumulate(X, self._new_accumulator()))

    def _resolve_precision(self, X, streaming):
        """Float32 products for float32 data when the error asked for is within their reach."""
        return _policy.gram_precision(
            float32_data=_array.float_dtype_for(X) == "float32",
            tol=self.tol,
            width_request=self.rank is not None and not streaming,
        )

    # ------------------------------------------------------------ validation
    def _check_params(self):
        params = {name: getattr(self, name) for name in self._parameter_constraints}
        check_params(params, self._parameter_constraints, type(self).__name__)  # no inspect
        if self.rank is not None and self.tol is not None:
            raise ValueError(
                f"Give rank or tol, not both (got rank={self.rank!r}, tol={self.tol!r})."
            )
        if self.method == "randomized" and self.rank is None:
            raise ValueError(
                "method='randomized' needs rank (the sketch has rank + 10 rows); with "
                f"{'tol' if self.tol is not None else 'the numerical rank'} use "
                "method='auto', 'gram' or 'qr'."
            )

    def _requested_rank(self, shape, streaming=False):
        """The rank asked for with ``rank`` (None when ``tol`` or numerical rank decide).

        While streaming, fewer rows than ``rank`` seen so far cap the rank at the row count.
        """
        if self.rank is None:
            return None
        n, m = shape
        limit = min(n, m)
        if isinstance(self.rank, numbers.Integral):
            if streaming and self.rank <= m:
                return min(int(self.rank), n)
            if self.rank > limit:
                raise ValueError(
                    f"rank={self.rank} exceeds min(n_samples, n_features) = min({n}, {m}) = "
                    f"{limit}; choose rank <= {limit} or a float in (0, 1) for a fraction."
                )
            return int(self.rank)
        return min(limit, _policy.width_for_fraction(self.rank, m))

    def _resolve_method(self, X, k, streaming):
        """The route of ``method="auto"``: the rule table of :mod:`skid._policy`."""
        if self.method != "auto":
            return self.method
        if (
            not streaming
            and _array.array_kind(X) != "dask"  # Dask arrays take the blockwise Gram route
            and _policy.prefers_randomized(k, X.shape[1])
        ):
            return "randomized"
        numerical_rank = k is None and self.tol is None
        float64_data = _array.float_dtype_for(X) == "float64"
        return _policy.exact_route(self.tol, numerical_rank=numerical_rank and float64_data)

    def _check_data(self, X, reset, finite=True):
        """Validate X, keep it in its own library; NumPy-convertible input via sklearn."""
        X = self._move_to_backend(X)
        if _array.array_kind(X) == "dask":
            from . import _dask

            _dask.check_shape(X)  # finiteness is checked by the tasks that read the chunks
            return _check_device_array(self, X, reset, finite=False)
        if reset and type(X) is np.ndarray and X.dtype in _FLOAT_DTYPES and (
            X.ndim == 2 and min(X.shape) > 0
        ):  # nothing for sklearn to convert: the same checks without its overhead (0.2 ms)
            return _check_device_array(self, X, reset, finite)
        if _array.array_kind(X) == "numpy":
            return validate_data(
                self,
                X,
                reset=reset,
                dtype=[np.float64, np.float32],
                ensure_min_features=1,
                ensure_all_finite=finite,
            )
        return _check_device_array(self, X, reset, finite)

    def _move_to_backend(self, X):
        kind = _array.array_kind(X)
        if self.backend == "numpy" and _array.is_gpu(X):
            return _array.to_numpy(X)
        if self.backend == "cupy" and kind != "cupy":
            try:
                import cupy
            except ImportError as exc:
                raise ImportError(
                    "backend='cupy' needs CuPy: pip install 'skid[cupy]' (with a CUDA GPU)."
                ) from exc
            return cupy.from_dlpack(X) if kind == "torch" and X.is_cuda else cupy.asarray(X)
        return X

    # ---------------------------------------------------------------- using
    def transform(self, X):
        """The selected columns ``X[:, selected_features_]``, in pivot order.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)

        Returns
        -------
        X_selected : array of shape (n_samples, rank_)
            Same array type and dtype as the validated input (a lazy Dask array for a Dask
            array).
        """
        check_is_fitted(self)
        X = self._check_data(X, reset=False)
        return X[:, _array.from_numpy(self.selected_features_, X)]

    def inverse_transform(self, X):
        """Interpolate all features from the selected ones: ``X @ interpolation_matrix_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, rank_)
            Values of the selected features, in pivot order (as ``transform`` returns them).

        Returns
        -------
        X_full : array of shape (n_samples, n_features_in_)
            In ``X``'s array type (a lazy Dask array for a Dask array).
        """
        check_is_fitted(self)
        if _array.array_kind(X) == "numpy":
            X = np.asarray(X)
            if X.dtype.kind not in "fc":
                X = X.astype(np.float64)
        if X.ndim != 2 or X.shape[1] != self.rank_:
            raise ValueError(
                f"inverse_transform expects an array of shape (n_samples, {self.rank_}) "
                f"(the output of transform); got shape {tuple(X.shape)}."
            )
        T = self.interpolation_matrix_
        if _array.array_kind(T) != _array.array_kind(X) or _array.is_gpu(T) != _array.is_gpu(X):
            T = _array.from_numpy(_array.to_numpy(T), X)
        return X @ _array.astype(T, _array.dtype_name(X))

    def score(self, X, y=None):
        """Relative reconstruction quality ``1 − ‖X − X̂‖_F / ‖X‖_F`` (1 is perfect).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        X = self._check_data(X, reset=False)
        residual = _array.frob_norm(X - self.inverse_transform(self.transform(X)))
        norm = _array.frob_norm(X)
        if norm == 0:
            return 1.0 if residual == 0 else 0.0
        return 1.0 - residual / norm

    def get_support(self, indices=False):
        """Which features are kept.

        Parameters
        ----------
        indices : bool, default=False
            False: a boolean mask of shape (n_features_in_,). True: the selected indices in
            pivot order (``selected_features_``), the order ``transform`` returns them in.

        Returns
        -------
        support : ndarray
        """
        check_is_fitted(self)
        if indices:
            return self.selected_features_.copy()
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.selected_features_] = True
        return mask

    def get_feature_names_out(self, input_features=None):
        """Names of the selected features, in pivot order.

        Parameters
        ----------
        input_features : array-like of str, default=None
            Input feature names; default ``feature_names_in_`` or ``x0, x1, ...``.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        names = _input_feature_names(self, input_features)
        return names[self.selected_features_]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _input_feature_names(estimator, input_features):
    """Validated input feature names as an object array."""
    fitted = getattr(estimator, "feature_names_in_", None)
    if input_features is None:
        if fitted is not None:
            return np.asarray(fitted, dtype=object)
        return np.asarray([f"x{i}" for i in range(estimator.n_features_in_)], dtype=object)
    names = np.asarray(input_features, dtype=object)
    if names.ndim != 1 or names.size != estimator.n_features_in_:
        raise ValueError(
            f"input_features should have length {estimator.n_features_in_} (n_features_in_); "
            f"got {names.size}."
        )
    if fitted is not None and not np.array_equal(names, fitted):
        raise ValueError("input_features is not equal to feature_names_in_.")
    return names


def _check_device_array(estimator, X, reset, finite=True):
    """Checks for CuPy arrays and torch tensors, done in their own library."""
    dtype = _array.dtype_name(X)
    if "complex" in dtype:
        raise TypeError(f"Complex data are not supported (got dtype {dtype}).")
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2-D array (n_samples, n_features), got shape {tuple(X.shape)}; "
            "reshape a single feature with X.reshape(-1, 1) or a single sample with "
            "X.reshape(1, -1)."
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"Found an empty array of shape {tuple(X.shape)}; need at least 1x1.")
    X = _array.astype(X, _array.float_dtype_for(X))
    if finite and not _array.all_finite(X):
        raise ValueError("Input X contains NaN or infinity; remove or impute those entries.")
    if reset:
        estimator.n_features_in_ = X.shape[1]
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(
            f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input."
        )
    return X


def interp_decomp(A, rank=None, *, tol=None, method="auto", backend="auto", random_state=None):
    """Column interpolative decomposition of a matrix: ``A ≈ A[:, selected] @ T``.

    Parameters
    ----------
    A : array-like of shape (n, m)
        NumPy array, CuPy array or torch tensor.
    rank, tol, method, backend, random_state
        As in :class:`InterpolativeDecomposition`.

    Returns
    -------
    selected : ndarray of shape (k,)
        Selected column indices in pivot order.
    T : array of shape (k, m)
        Interpolation matrix (identity on ``selected``), in A's array type.

    Examples
    --------
    >>> import numpy as np
    >>> from skid import interp_decomp
    >>> A = np.outer([1.0, 2.0, 3.0], [1.0, 0.5, 2.0])
    >>> selected, T = interp_decomp(A, rank=1)
    >>> selected.tolist(), np.round(T, 3).tolist()
    ([2], [[0.5, 0.25, 1.0]])
    """
    est = InterpolativeDecomposition(
        rank, tol=tol, method=method, backend=backend, random_state=random_state
    ).fit(A)
    return est.selected_features_, est.interpolation_matrix_
