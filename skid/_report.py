"""Plain-text tables: the per-unit report of a fitted compressor (``NetworkCompressor.report()``
and ``skid compress`` print the same one) and the aligned-table layout they share; a
``layers_`` row as plain Python values (for JSON)."""

from __future__ import annotations

__all__ = ["format_table", "format_units_report", "plain_layer"]


def plain_layer(layer: dict) -> dict:
    """A ``layers_`` entry with NumPy/torch scalars turned into Python numbers."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in layer.items()}


def format_units_report(layers, flops, params) -> str:
    """One row per pruned unit (widths before → after, fraction kept, ID error), then totals.

    Parameters
    ----------
    layers : list of dict
        ``NetworkCompressor.layers_``.
    flops, params : dict
        ``{"before": int, "after": int}``: ``flops_`` and ``params_``.

    Returns
    -------
    str
    """
    header = ("kind", "producer", "consumer", "width", "kept", "ID error")
    rows = [
        (
            layer.get("kind", "channels"), layer["producer"], layer["consumer"],
            f"{layer['width_before']} -> {layer['width_after']}",
            f"{layer['width_after'] / layer['width_before']:.0%}",
            f"{layer['error']:.2e}",
        )
        for layer in layers
    ]
    return "\n".join([
        format_table(header, rows, align="<<<>>>"),
        "",
        f"FLOPs per sample: {_si(flops['before'])} -> {_si(flops['after'])} "
        f"({_kept(flops):.1%} kept; 2 FLOPs per multiply-add)",
        f"parameters:       {_si(params['before'])} -> {_si(params['after'])} "
        f"({_kept(params):.1%} kept)",
    ])


def format_table(header, rows, align=None) -> str:
    """Rows of strings as a plain-text table; ``align`` holds one '<' or '>' per column.

    Examples
    --------
    >>> print(format_table(("name", "width"), [("conv1", "32"), ("fc", "128")], align="<>"))
    name   width
    -----  -----
    conv1     32
    fc       128
    """
    align = align or "<" * len(header)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells):
        cells = zip(cells, align, widths, strict=True)
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _kept(sizes: dict) -> float:
    return sizes["after"] / sizes["before"] if sizes["before"] else 1.0


def _si(number) -> str:
    """1234567 -> '1.23M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:g}"
