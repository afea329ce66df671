"""Where training memory goes: the bytes each module saves for the backward pass.

Peak memory says how much; this says which layer. One forward in training mode runs under
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves is attributed to the
innermost module running at that moment (its dotted name cut to ``depth`` parts). A storage is
counted once, by whoever saved it first (views and tensors saved by several ops share one storage),
and parameters are not counted (they are not activations). The total is the activation memory held
from the end of the forward into the backward, the main term of the training peak.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn


def saved_bytes_by_module(
    model: nn.Module, forward: Callable[[], Tensor], *, depth: int = 1
) -> dict[str, int]:
    """Bytes saved for backward during ``forward()``, per module name cut to ``depth`` parts.

    Args:
        model: the module whose submodules get the attribution (hooks are removed afterwards).
        forward: runs the forward pass (e.g. ``lambda: loss(model(x), y)``); the graph it builds is
            freed on return.
        depth: how many dotted parts of a module name to keep (``1``: ``encoder``, ``decoder1``, ...).
            Saves made outside any submodule go to ``"<model>"``.

    Returns:
        ``{name: bytes}``, largest first.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"saved_bytes_by_module: depth must be an int >= 1, got {depth!r}")
    stack = ["<model>"]
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    per: Counter[str] = Counter()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in seen and key not in params:
            seen.add(key)
            where = stack[-1] if stack[-1] == "<model>" else ".".join(stack[-1].split(".")[:depth])
            per[where] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        del out
    finally:
        for h in handles:
            h.remove()
    return dict(per.most_common())
