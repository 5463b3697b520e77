"""The Gram accumulator: ``XᵀX`` streamed block by block into a packed upper triangle."""

from __future__ import annotations

import math

import numpy as np

from .. import _array
from . import _blocking
from ._blocking import (
    binary_exponent,
    check_block,
    non_finite_data,
    quiet,
    row_blocks,
    scale_block,
)
from ._cholesky import factorize_gram, mirror_upper
from ._factorization import PivotedFactorization

#: Squared magnitudes safe to sum in each product dtype (outside: scale the block first).
_GRAM_SAFE = {"float64": (2.0**-600, 2.0**1000), "float32": (2.0**-60, 2.0**100)}


def triangle_size(m: int) -> int:
    """Entries of the upper triangle of an m × m matrix, diagonal included."""
    return m * (m + 1) // 2


def _panel_bounds(m: int):
    """``(start, stop)`` of the column panels of an m × m triangle."""
    step = _blocking.TRIANGLE_STEP
    return [(start, min(start + step, m)) for start in range(0, m, step)]


def _panel_mask(width: int, stop: int, like):
    """Where a stored panel (``width × stop``: ``G[stop - width : stop, :stop]``) holds the
    upper triangle of G (row a: G's column ``stop - width + a``, rows up to it), as a boolean
    array of ``like``'s kind; in row-major order, these entries are LAPACK's packed storage."""
    start = stop - width
    mask = np.arange(stop)[None, :] <= np.arange(start, stop)[:, None]
    return _array.from_numpy(mask, like)


def _blas_readable(a) -> bool:
    """Whether BLAS reads the 2-D array in place (otherwise NumPy's matmul falls back to a
    loop without BLAS). Row slices of C- or F-ordered arrays are; torch and CuPy handle
    strides themselves."""
    if not isinstance(a, np.ndarray):
        return True
    return (_blocking.leading_dimension(a) is not None
            or _blocking.leading_dimension(a.T) is not None)


def _gram_slices(X, dtype: str, exp: int) -> list:
    """Row slices of X that :class:`GramAccumulator` multiplies one at a time."""
    n, m = X.shape
    if dtype == "float64" and _array.dtype_name(X) == "float64" and exp == 0 and (
        _blas_readable(X)
    ):
        return [slice(None)]  # nothing to upcast or scale: the products read X in place
    if dtype == "float32" and _array.dtype_name(X) == "float32" and exp == 0 and (
        _blas_readable(X)
    ):  # float32 products read X in place: longer blocks, of equal length
        parts = -(-n // _blocking.NATIVE_VIEW_ROWS)
        step = max(1, -(-n // max(parts, 1)))
        return [slice(start, min(start + step, n)) for start in range(0, n, step)]
    max_elements = (_blocking.BLOCK_ELEMENTS if dtype == "float64"
                    else _blocking.NATIVE_BLOCK_ROWS * m)
    return list(row_blocks(n, m, max_elements))


def _gram_block(X, rows, dtype: str, exp: int):
    """``X[rows] / 2**exp`` in ``dtype``, laid out for BLAS."""
    block = scale_block(_array.astype(X[rows], dtype), exp)
    return block if _blas_readable(block) else np.ascontiguousarray(block)


def _add_scaled(total, part, factor: float = 1.0) -> None:
    """``total += factor · part`` in place, ``total`` float64 (a float32 ``part`` is cast in
    the ufunc's buffer, and scaled in float64, where its small entries cannot underflow)."""
    if _array.array_kind(total) == "torch":
        total.add_(part, alpha=factor)  # computed in total's float64
    elif factor == 1.0:
        total += part
    else:
        total += _array.astype(part, "float64") * factor


def _float64_copy(part):
    """A new float64 array of ``part``'s values, in its library and device."""
    if _array.dtype_name(part) == "float64":
        return _array.copy(part)
    return _array.astype(part, "float64")


def _as_kind(part, like):
    """``part`` in the library (and torch device) of ``like``."""
    kind = _array.array_kind(like)
    if _array.array_kind(part) == kind:
        return part.to(like.device) if kind == "torch" else part
    return _array.from_numpy(_array.to_numpy(part), like)


def _add_product(total, left, right, factor: float, scratch, capacity: int):
    """``total += factor · (left @ right)`` in place: the product in the operands' dtype and
    library, written into ``scratch`` (a flat buffer of that dtype, reused; None: one of
    ``capacity`` entries is made here), then added into the float64 ``total``. Returns the
    scratch buffer."""
    kind = _array.array_kind(left)
    size = total.shape[0] * total.shape[1]
    if kind != _array.array_kind(total):  # a statistic of another kind (merged in)
        _add_scaled(total, _as_kind(left @ right, total), factor)
    elif kind == "torch":
        import torch

        if left.dtype == total.dtype:  # float64 products: one GEMM, straight into the panel
            total.addmm_(left, right, alpha=factor)
            return scratch
        if scratch is None:
            scratch = left.new_empty(capacity)
        out = scratch[:size].view(total.shape)
        torch.mm(left, right, out=out)
        total.add_(out, alpha=factor)
    elif kind == "numpy":
        if scratch is None:
            scratch = np.empty(capacity, dtype=left.dtype)
        out = scratch[:size].reshape(total.shape)
        np.matmul(left, right, out=out)
        _add_scaled(total, out, factor)
    else:  # CuPy
        _add_scaled(total, left @ right, factor)
    return scratch


#: Largest buffer (bytes) for a row block's whole product (see :func:`_whole_product`): up
#: to it an update needs no pass over X before the products; past it (the widest layers) the
#: products go panel by panel through an m × 256 buffer, after a pass that checks the block.
_WHOLE_PRODUCT_BYTES = 8 << 20


def _whole_entries(m: int, kind: str) -> int:
    """Entries of :func:`_whole_product`'s buffer for an m-wide block of the library ``kind``."""
    if kind == "numpy":
        return m * m
    return sum((stop - start) * stop for start, stop in _panel_bounds(m))


def _whole_products(X, dtype: str, products: str) -> bool:
    """Whether :class:`GramAccumulator` multiplies X's blocks whole (``products``: its
    parameter)."""
    if products not in ("auto", "whole", "panels"):
        raise ValueError(f"products must be 'auto', 'whole' or 'panels'; got {products!r}.")
    m = X.shape[1]
    if products != "auto" or m == 0:
        return products == "whole" and m > 0
    size = _whole_entries(m, _array.array_kind(X)) * np.dtype(dtype).itemsize
    return size <= _WHOLE_PRODUCT_BYTES


def _whole_product(block, buffer):
    """Each panel's rows ``G[start:stop, :stop]`` of ``G = blockᵀ block``, as views into
    ``buffer`` (flat, of the block's dtype and library; None: a new one). NumPy computes G in
    one ``?syrk`` (half a GEMM's flops: the call of the floor ``XᵀX`` itself); torch and CuPy,
    which have no ``syrk``, multiply panel by panel (the triangle's flops, not a full GEMM's),
    and torch on the CPU the rows left of each panel's square in one product and the square in
    shorter steps of rows (:func:`._blocking.product_step`), each only up to its own last
    column, or, on one thread, through NumPy's BLAS into the same panels
    (:func:`_product_step`). Returns ``(buffer, rows, symmetric)``: ``symmetric`` False
    when the squares' other triangles were left out (zeros there: only each square's lower
    triangle, G's upper one, holds G)."""
    kind = _array.array_kind(block)
    m = block.shape[1]
    bounds = _panel_bounds(m)
    step = _product_step(block)
    if buffer is None:
        size = _whole_entries(m, kind)
        if kind == "torch":  # left-out entries are zeros, never stale memory
            buffer = (block.new_zeros if step else block.new_empty)(size)
        else:
            buffer = _xp(block).empty(size, dtype=block.dtype)
    if kind == "numpy":
        square = buffer.reshape(m, m)
        np.matmul(block.T, block, out=square)
        return buffer, [square[start:stop, :stop] for start, stop in bounds], True
    rows, offset, symmetric = [], 0, True
    for start, stop in bounds:
        part = buffer[offset : offset + (stop - start) * stop].reshape(stop - start, stop)
        if step == _NUMPY_BLAS:  # through NumPy views of the block and the panel's rows
            _numpy_panel_rows(block.numpy(), part.numpy(), start, stop)
        elif step is None or step >= stop - start:
            _xp(block).matmul(block[:, start:stop].T, block[:, :stop], out=part)
        else:  # written in place: BLAS's leading dimension is the panel's row length
            import torch

            if start:  # the rows left of the square in one product, as NumPy's route does
                torch.mm(block[:, start:stop].T, block[:, :start], out=part[:, :start])
            for low in range(start, stop, step):  # the square's lower triangle, in steps
                high = min(low + step, stop)
                torch.mm(block[:, low:high].T, block[:, start:high],
                         out=part[low - start : high - start, start:high])
            symmetric = False
        rows.append(part)
        offset += (stop - start) * stop
    return buffer, rows, symmetric


def _numpy_panel_rows(block: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """``out = block[:, start:stop]ᵀ block[:, :stop]``: one ``?gemm`` left of the square,
    ``?syrk`` on it (NumPy fills both of its triangles)."""
    left = block[:, start:stop].T
    if start:
        np.matmul(left, block[:, :start], out=out[:, :start])
    np.matmul(left, block[:, start:stop], out=out[:, start:])


#: :func:`_product_step`'s answer for a torch block that NumPy's BLAS multiplies.
_NUMPY_BLAS = 0


def _product_step(block) -> int | None:
    """How :func:`_whole_product` multiplies a torch block on the CPU: through NumPy's BLAS
    (``_NUMPY_BLAS``) where torch runs on one thread, else in :func:`._blocking.product_step`
    rows at a time; None (one product per panel) for other blocks: GPU GEMMs were not
    measured in shorter steps.

    NumPy's BLAS has ``?syrk`` for each panel's square (half its products, where torch
    multiplies the whole square or steps of it) and multiplies the rest of a panel's rows in
    one ``?gemm``: 0.72–0.89× the time of torch's steps, one thread, float32, m = 96 to
    1,536 (``benchmarks/bench_gram.py --torch-products``). With several torch threads the
    steps stay with torch: two thread pools (OpenBLAS's and torch's OpenMP one) spin against
    each other on the same cores (MiniLM's fit on two threads of each took twice as long)."""
    if _array.array_kind(block) != "torch" or block.device.type != "cpu":
        return None
    import torch

    if torch.get_num_threads() == 1:
        return _NUMPY_BLAS
    return _blocking.product_step(block.shape[1])


def _diagonal_max(parts) -> float:
    """The largest of G's diagonal (the columns' sums of squares; NaN if one is) from the
    panels' rows of G: one read from the device (one sync)."""
    maxima = [part[:, part.shape[1] - part.shape[0] :].diagonal().max() for part in parts]
    return float(maxima[0] if len(maxima) == 1 else _xp(parts[0]).stack(maxima).max())


def _xp(a):
    """The array library of ``a`` (``numpy``, ``torch`` or ``cupy``), for its ``matmul``."""
    kind = _array.array_kind(a)
    if kind == "numpy":
        return np
    if kind == "torch":
        import torch

        return torch
    import cupy

    return cupy


class GramAccumulator:
    """Streams row blocks of X into ``XᵀX`` (summed in float64, on the blocks' own device).

    Only the upper triangle is stored, as column panels ``TRIANGLE_STEP`` (256) wide: panel
    p holds ``G[:stop_p, start_p:stop_p]``, column-major (kept as the C-ordered array of its
    transpose, ``G[start_p:stop_p, :stop_p]``: for NumPy, the Fortran-ordered panel), in
    float64 and in the blocks' own library and device — about ``m (m + 256) / 2`` entries
    instead of m², whatever the number of rows; each panel's square ``G[start_p:stop_p,
    start_p:stop_p]`` holds both its triangles (a statistic of m ≤ 256 columns is one
    symmetric m × m array), except where torch multiplied on the CPU in shorter steps (on
    several threads, :func:`_whole_product`): there only the square's lower triangle (G's
    upper one) holds G, and the other is not read. Each panel's rows of a block's product
    are added into it in place (an empty statistic's first block is copied in, not added to
    zeros; a one-panel one keeps the product's own array); the products are made whole, or
    panel by panel through an m × 256 buffer for the widest statistics (``products``), so
    accumulating never holds an m × m temporary past ``_WHOLE_PRODUCT_BYTES``.

    Each block is checked before anything is added, from its product's diagonal alone (its
    columns' sums of squares: ``|G_ij| ≤ sqrt(G_ii G_jj)``, so a finite diagonal in range
    means finite entries): a block with NaN/Inf raises and leaves the statistic as it was,
    and a block whose squares would overflow, or underflow into lost digits, is divided by a
    power of two first (exact). The statistic is kept as ``gram = XᵀX / 4**scale_exp``
    (``scale_exp`` is 0 unless some block needed scaling); every result of the ID is
    scale-free.

    Parameters
    ----------
    precision : {"float64", "native"}
        ``"float64"``: each sub-block is upcast and multiplied in float64 (never the whole
        matrix at once). ``"native"``: float32 (and half) blocks are multiplied in float32 over
        ``NATIVE_BLOCK_ROWS`` rows at a time (float32 data read in place: up to
        ``NATIVE_VIEW_ROWS``, in equal blocks) and summed in float64 — twice as fast, reliable
        for relative errors down to :data:`FLOAT32_GRAM_RELIABLE_ERROR`.
    products : {"auto", "whole", "panels"}
        How an update multiplies a row block: ``"whole"``, all of ``blockᵀ block`` into one
        buffer (NumPy: one ``?syrk``, the call of the floor ``XᵀX`` itself; torch and CuPy:
        the panels' products), checked by its diagonal before it is added; ``"panels"``, a
        pass over the block that checks it, then one product per panel through an m × 256
        buffer (the accumulator's only way before; the least memory); ``"auto"``, whole up to
        ``_WHOLE_PRODUCT_BYTES`` of buffer (8 MiB), panels past it.
    """

    def __init__(self, precision: str = "float64", products: str = "auto"):
        self.precision = precision
        self.products = products
        self._clear()

    def _clear(self) -> None:
        self._panels = None  # the upper triangle, column panel by column panel
        self.n_samples = 0
        self.n_features = None
        self.scale_exp = 0
        self.float32_products = False
        self._checked = True  # every block was checked from its diagonal (not set_triangle's)
        self._symmetric = True  # each panel's square holds both triangles (see the class)

    @property
    def nbytes(self) -> int:
        """Bytes the statistic holds (0 before any rows)."""
        return sum(int(panel.nbytes) for panel in self._panels or ())

    def _like(self):
        """An array of the statistic's library and device."""
        return self._panels[0] if self._panels else np.zeros(0)

    @property
    def gram(self):
        """The statistic ``XᵀX / 4**scale_exp`` (float64, m × m, symmetric, in the statistic's
        library and device; None before any rows): a new array, built from the triangle."""
        if self._panels is None:
            return None
        m = self.n_features
        gram = _array.zeros((m, m), self._like(), "float64")
        for panel in self._panels:
            width, stop = panel.shape
            start = stop - width
            gram[start:stop, :start] = panel[:, :start]
            gram[:start, start:stop] = panel[:, :start].T
            square = panel[:, start:stop]  # its lower triangle is the upper one of G's
            gram[start:stop, start:stop] = _array.tril(square) + _array.tril(square, -1).T
        return gram

    def host_gram(self) -> np.ndarray | None:
        """:attr:`gram` as a new float64 NumPy array on the host (None before any rows): what
        the host's factorizations read. Assembled by NumPy from host views of the panels (a
        device statistic's are copied over), not by the array library: torch's element-wise
        ops from the worker threads that factorize units side by side, beside another
        unit's LAPACK call, took 37 ms for MiniLM's 384-wide head statistic."""
        if self._panels is None:
            return None
        return mirror_upper(self._host_upper())

    def _host_upper(self, consume: bool = False) -> np.ndarray:
        """A new C-ordered m × m float64 host array whose upper triangle is the statistic
        (zeros below; each panel's square read by its triangle that holds G). ``consume``:
        each panel is released once copied (peak: the array and one panel)."""
        gram = np.zeros((self.n_features,) * 2)
        for p, panel in enumerate(self._panels):
            width, stop = panel.shape
            gram[:stop, stop - width : stop] = _array.to_numpy(panel).T
            if consume:
                self._panels[p] = None  # the loop's name holds it until the next panel
        return gram

    def triangle(self):
        """The statistic's upper triangle in LAPACK's packed storage (column j's rows 0..j,
        columns in order): a new 1-D float64 array of ``triangle_size(m)`` entries in the
        statistic's library and device; None before any rows. What data-parallel ranks sum;
        :meth:`set_triangle` reads it back."""
        if self._panels is None:
            return None
        like = self._like()
        packed = _array.zeros((triangle_size(self.n_features),), like, "float64")
        for panel in self._panels:
            width, stop = panel.shape
            entries = slice(triangle_size(stop - width), triangle_size(stop))
            packed[entries] = panel[_panel_mask(width, stop, like)]
        return packed

    def set_triangle(self, values, n_features: int, scale_exp: int = 0) -> GramAccumulator:
        """Make the statistic the packed upper triangle ``values`` (as :meth:`triangle` gives
        it) of an ``n_features``-wide Gram divided by ``4**scale_exp``, kept in the library and
        on the device of ``values``; the old statistic is released first."""
        if tuple(values.shape) != (triangle_size(n_features),):
            raise ValueError(f"A packed {n_features} × {n_features} triangle has "
                             f"{triangle_size(n_features)} entries; got {tuple(values.shape)}.")
        values = _array.astype(values, "float64")
        self._panels = None
        panels = []
        for start, stop in _panel_bounds(n_features):
            panel = _array.zeros((stop - start, stop), values, "float64")
            panel[_panel_mask(stop - start, stop, values)] = values[
                triangle_size(start) : triangle_size(stop)
            ]
            square = panel[:, start:stop]  # stored: its lower triangle (G's upper one)
            square += _array.tril(square, -1).T
            panels.append(panel)
        self._panels, self.n_features, self.scale_exp = panels, n_features, scale_exp
        self._checked = False  # summed elsewhere: factorize checks every entry
        self._symmetric = True
        return self

    def update(self, X) -> GramAccumulator:
        """Add the rows of the 2-D array ``X`` (NumPy, CuPy or torch) to the statistic.

        Every row block's diagonal is checked before its product is added, and a bad block
        anywhere in X leaves the statistic as it was.
        """
        X = check_block(X, self.n_features)
        if _array.array_kind(X) == "torch":
            X = X.detach()  # a statistic, not a graph (products into buffers refuse graphs)
        dtype = "float64" if self.precision == "float64" else _array.float_dtype_for(X)
        if dtype == "float32" and not _array.exact_float32_matmul(X):
            dtype = "float64"  # TF32/bf16 products would lose the digits the ID needs
        if not _whole_products(X, dtype, self.products):
            self._update_panels(X, dtype)
        elif self._panels is None or len(_gram_slices(X, dtype, 0)) == 1:
            self._update_whole(X, dtype)
        else:  # several blocks into a statistic that must survive a bad one: a part, merged
            return self.merge(GramAccumulator(self.precision, self.products).update(X))
        self.n_features = X.shape[1]
        self.float32_products |= dtype == "float32"
        self.n_samples += X.shape[0]
        return self

    def _update_whole(self, X, dtype: str) -> None:
        """Each row block's whole product (:func:`_whole_product`) into one buffer, its
        diagonal checked, then added into the panels: no pass over X before the products. A
        statistic that had rows takes a single block here (checked before anything is added);
        an empty one is emptied again on a bad block, or redone, scaled, when the blocks'
        squares leave the safe range. An empty statistic's panels are its first block's
        product (copied in float64; a one-panel float64 product of the only block is kept as
        it is: the Gram's own m × m array, no zeros and no addition)."""
        low, high = _GRAM_SAFE[dtype]
        fresh = self._panels is None
        exp, scaled, buffer = 0, False, None
        while True:
            if fresh:
                self._panels, self.scale_exp = None, exp
            factor, largest = None, 0.0  # the scales are reconciled once a block is checked
            slices = _gram_slices(X, dtype, exp)
            with quiet():  # overflow and underflow are checked and handled here
                for rows in slices:
                    buffer, parts, whole = _whole_product(_gram_block(X, rows, dtype, exp),
                                                          buffer)
                    value = _diagonal_max(parts)
                    if not value <= largest and largest == largest:  # larger, or NaN (stays)
                        largest = value
                    if not largest <= high or (not fresh and largest < low):
                        break  # NaN, Inf or squares near overflow; or one block to scale
                    self._symmetric = self._symmetric and whole
                    if self._panels is None:  # an empty statistic's first block
                        keep = len(slices) == 1 and len(parts) == 1 and dtype == "float64"
                        self._panels = parts if keep else [_float64_copy(part) for part in parts]
                        continue
                    factor = self._reconcile(exp) if factor is None else factor
                    for panel, part in zip(self._panels, parts, strict=True):
                        _add_scaled(panel, _as_kind(part, panel), factor)
            if largest <= high and (scaled or low <= largest):
                return
            amax = _array.max_abs(X)  # the scale that brings every square into range
            if scaled or not math.isfinite(amax):
                if fresh:
                    self._clear()
                raise non_finite_data()
            if amax == 0.0:  # zeros: nothing to add
                return
            exp, scaled = binary_exponent(amax), True

    def _update_panels(self, X, dtype: str) -> None:
        """Panel by panel (wide statistics): every block's diagonal is checked from its column
        sums of squares first, then each block adds one product per panel."""
        m = X.shape[1]
        slices = _gram_slices(X, dtype, 0)
        largest, block = 0.0, None
        with quiet():  # overflow and underflow are checked and handled below
            for rows in slices:
                block = _gram_block(X, rows, dtype, 0)
                value = _array.max_column_sq_sum(block)  # the largest of blockᵀ block's diagonal
                if not value <= largest:  # larger, or NaN
                    largest = value
                if not math.isfinite(value):
                    break
        kept = block if len(slices) == 1 else None  # multiplied below without a second copy
        low, high = _GRAM_SAFE[dtype]
        exp = 0
        if not low <= largest <= high:  # NaN fails too
            amax = _array.max_abs(X)
            if not math.isfinite(amax):
                raise non_finite_data()
            exp = binary_exponent(amax)  # 0 for zeros
            if exp:
                slices, kept = _gram_slices(X, dtype, exp), None
        if self._panels is None:
            self._panels = [_array.zeros((stop - start, stop), X, "float64")
                            for start, stop in _panel_bounds(m)]
            self.scale_exp = exp
        factor = self._reconcile(exp)
        scratch = None  # one buffer for every panel's product, of the largest one's size
        capacity = max((panel.shape[0] * panel.shape[1] for panel in self._panels), default=0)
        with quiet():  # underflow of entries far below the largest one is harmless
            for rows in slices:
                block = kept if kept is not None else _gram_block(X, rows, dtype, exp)
                for panel in self._panels:
                    width, stop = panel.shape
                    scratch = _add_product(panel, block[:, stop - width : stop].T,
                                           block[:, :stop], factor, scratch, capacity)

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add the rows accumulated by ``other`` (a sum: Grams of row blocks add up, panel by
        panel; the two scales are reconciled as for a new block). ``other`` is not modified."""
        if other._panels is None:
            return self
        if self.n_features is not None and other.n_features != self.n_features:
            raise ValueError(f"The merged statistic has {other.n_features} columns; this one "
                             f"has {self.n_features}.")
        if self._panels is None:
            self._panels = [_array.copy(panel) for panel in other._panels]
            self.scale_exp = other.scale_exp
        else:
            factor = self._reconcile(other.scale_exp)
            for ours, theirs in zip(self._panels, other._panels, strict=True):
                _add_scaled(ours, _as_kind(theirs, ours), factor)
        self.n_features = other.n_features
        self.n_samples += other.n_samples
        self.float32_products = self.float32_products or other.float32_products
        self._checked = self._checked and other._checked
        self._symmetric = self._symmetric and other._symmetric
        return self

    def _reconcile(self, exp: int) -> float:
        """Bring the statistic to the scale of a part divided by ``4**exp`` where that is the
        larger (exact: a power of two); returns the factor to add the part with."""
        if exp > self.scale_exp:
            for panel in self._panels:
                panel *= math.ldexp(1.0, 2 * (self.scale_exp - exp))
            self.scale_exp = exp
        return math.ldexp(1.0, 2 * (exp - self.scale_exp))

    def factorize(self, consume: bool = False, *, rank=None, tol=None) -> PivotedFactorization:
        """The pivoted Cholesky factorization of the accumulated Gram matrix (on the host).

        The triangle is copied into the upper triangle of one new C-ordered m × m float64
        array, which LAPACK factorizes in place. A one-panel statistic (m ≤ 256) is the whole
        Gram: it is read in place (on the host), and copied only when LAPACK runs.

        Parameters
        ----------
        consume : bool
            Hand the statistic over: each panel is released as soon as it is copied (peak:
            the m × m array and one panel), and the accumulator is left empty, as new (also
            when the factorization raises). A caller that goes on accumulating must leave it
            False.
        rank, tol : int or float, optional
            The caller's width rule, when known: only the pivots it needs may be computed (a
            partial factorization; see :func:`factorize_gram`).

        Returns
        -------
        PivotedFactorization
        """
        if self._panels is None:
            raise ValueError("No data has been accumulated yet.")
        eps = float(np.finfo(np.float32).eps) if self.float32_products else None
        rule = {"scale_exp": self.scale_exp, "upper": True, "checked": self._checked,
                "rank": rank, "tol": tol}
        try:
            if len(self._panels) == 1:  # the whole Gram (see the class)
                panel = self._panels[0]
                gram, copied = _array.to_numpy(panel), _array.is_gpu(panel)
                if consume:
                    self._panels[0] = panel = None
                if not self._symmetric:  # G's upper triangle is the stored square's lower
                    gram = gram.T
                return factorize_gram(gram, self.n_samples, eps, symmetric=self._symmetric,
                                      overwrite=consume or copied, **rule)
            # C-ordered: LAPACK reads its upper triangle as the transpose's lower one, the
            # faster form (see _cholesky._lapack_matrix)
            gram = self._host_upper(consume)
            return factorize_gram(gram, self.n_samples, eps, overwrite=True, **rule)
        finally:
            if consume:
                self._clear()
