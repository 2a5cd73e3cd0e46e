"""Context managers that install forward hooks and always remove them (baukit's nethook style).

    >>> import torch
    >>> from blip_trace_widgets.models.hooks import edit_output, record_outputs
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> with record_outputs(net, ["0"]) as seen, edit_output(net, "0", lambda out: out * 0):
    ...     y = net(torch.ones(1, 2))
    >>> bool((y == 0).all()), tuple(seen["0"].shape)
    (True, (1, 2))

Layer outputs are tensors in transformers 5.x and tuples in 4.x; both are handled:
the edit function and the recorder always see the first tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .anatomy import get_module


def first_tensor(output: object) -> torch.Tensor:
    """The main tensor of a module's output, whether a tensor or a tuple (transformers 4.x)."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


def replace_first(output: object, tensor: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


@contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, the output of module ``name`` is replaced by ``fn(output)``."""
    module = get_module(model, name)

    def hook(_module: nn.Module, _inputs: object, output: object) -> object:
        return replace_first(output, fn(first_tensor(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def record_outputs(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the latest output of each named module is kept in the yielded dict."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            def hook(_m: nn.Module, _i: object, output: object, name: str = name) -> None:
                seen[name] = first_tensor(output).detach()

            handles.append(get_module(model, name).register_forward_hook(hook))
        yield seen
    finally:
        for handle in handles:
            handle.remove()
