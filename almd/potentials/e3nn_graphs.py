"""Two clean-ups of the code e3nn generates for tensor products and linear layers.

e3nn writes each tensor product and each equivariant linear layer as an fx
graph that cuts its inputs into irreps blocks, ``x[:, a:b]`` or
``x.narrow(-1, a, n)``. Autograd's backward of a slice allocates a zero tensor
the size of the whole input and adds the block's gradient into it, once per
block: for a SevenNet-0 convolution's edge weights (n_edges × 960, 15 blocks)
that zero-fill-and-add is most of the force calculation. :func:`streamline`

1. turns all the blocks cut from one tensor into one ``torch.split``, whose
   backward is a single ``cat``;
2. drops the einsums whose result nothing uses (e3nn leaves them for
   TorchScript to remove, but runs its graphs unscripted).

Values and gradients (of any order) are unchanged: each gradient entry had one
contribution before and has the same one now.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["streamline"]

_EVERYTHING = slice(None, None, None)


def streamline(model: torch.nn.Module) -> int:
    """Rewrite every e3nn-generated fx graph inside ``model`` in place; the number rewritten."""
    count = 0
    for module in model.modules():
        for name in getattr(module, "__codegen__", ()):
            graph_module = getattr(module, name, None)
            if isinstance(graph_module, fx.GraphModule) and not _writes_in_place(graph_module.graph):
                _merge_block_slices(graph_module.graph)
                _drop_unused_products(graph_module.graph)
                graph_module.recompile()
                count += 1
    return count


def _writes_in_place(graph: fx.Graph) -> bool:
    # e3nn's Extract fills views of a buffer (out.narrow(...).copy_(...)): views there are not plain reads
    return any(n.op == "call_method" and str(n.target).endswith("_") for n in graph.nodes)


def _drop_unused_products(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in (torch.einsum, torch.functional.einsum) and not node.users:
            graph.erase_node(node)


def _block(node: fx.Node) -> tuple[fx.Node, str, int, int] | None:
    """(source, form, start, stop) when ``node`` cuts a block off the last axis of a 2-D source."""
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if (isinstance(source, fx.Node) and isinstance(index, tuple) and len(index) == 2
                and index[0] == _EVERYTHING and isinstance(index[1], slice) and index[1].step is None
                and isinstance(index[1].start, int) and isinstance(index[1].stop, int)):
            return source, "getitem", index[1].start, index[1].stop
    if node.op == "call_method" and node.target == "narrow" and len(node.args) == 4:
        source, dim, start, length = node.args
        if isinstance(source, fx.Node) and dim == -1 and isinstance(start, int) and isinstance(length, int):
            return source, "narrow", start, start + length
    return None


def _width(source: fx.Node) -> int | None:
    """The last-axis size of ``source`` when the graph states it: e3nn's ``x.reshape(-1, D)``."""
    if source.op == "call_method" and source.target == "reshape" and len(source.args) == 3:
        rows, width = source.args[1:]
        if rows == -1 and isinstance(width, int):
            return width
    return None


def _merge_block_slices(graph: fx.Graph) -> None:
    groups: dict[tuple[fx.Node, str], list[tuple[fx.Node, int, int]]] = {}
    for node in graph.nodes:
        found = _block(node)
        if found is not None:
            source, form, start, stop = found
            groups.setdefault((source, form), []).append((node, start, stop))
    for (source, form), blocks in groups.items():
        width = _width(source)
        if len(blocks) < 2 or width is None:
            continue
        ranges = sorted({(start, stop) for _, start, stop in blocks})
        if (any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])) or ranges[-1][1] > width or ranges[0][0] < 0
                or any(start >= stop for start, stop in ranges)):
            continue  # overlapping, empty or out of range: leave e3nn's slices as they are
        bounds = sorted({0, width, *(x for r in ranges for x in r)})
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        with graph.inserting_after(source):
            pieces = graph.call_function(torch.split, (source, sizes), {"dim": -1 if form == "narrow" else 1})
        for node, start, _ in blocks:
            with graph.inserting_after(pieces):
                piece = graph.call_function(operator.getitem, (pieces, bounds.index(start)))
            node.replace_all_uses_with(piece)
            graph.erase_node(node)
