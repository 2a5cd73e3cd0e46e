"""Where each module of the 0.3 layout lives now: ``import blip_trace_widgets.tracing`` still works, with a
:class:`DeprecationWarning` that names the new path, for one release.

    >>> import warnings
    >>> from blip_trace_widgets.relocated import MOVED, new_path
    >>> new_path("blip_trace_widgets.tracing")
    'blip_trace_widgets.causal_trace.tracer'
    >>> import sys
    >>> _ = sys.modules.pop("blip_trace_widgets.loading", None)   # as in a fresh interpreter
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from blip_trace_widgets.loading import load_model
    >>> load_model.__module__, "blip_trace_widgets.models.loading" in str(caught[0].message)
    ('blip_trace_widgets.models.loading', True)

    >>> from blip_trace_widgets.engine import TextStack, rows_per_chunk   # engine.py was split
    >>> TextStack.__module__, rows_per_chunk.__module__
    ('blip_trace_widgets.models.blip.stacks', 'blip_trace_widgets.models.chunks')

The package's ``__init__`` installs :class:`OldPaths` on ``sys.meta_path``; nothing else reads this table.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

PACKAGE = "blip_trace_widgets"

#: Module of the 0.3 layout -> its module now (both relative to the package).
MOVED: dict[str, str] = {
    "errors": "core.errors",
    "names": "core.names",
    "threads": "core.threads",
    "cache": "core.cache",
    "memory": "core.memory",
    "portable": "core.portable",
    "scoring": "core.scoring",
    "significance": "core.significance",
    "inputs": "core.inputs",
    "regions": "core.regions",
    "roles": "core.roles",
    "corruption": "corruptions.kinds",
    "heads": "models.heads",
    "anatomy": "models.anatomy",
    "loading": "models.loading",
    "hooks": "models.hooks",
    "data": "datasets.easy_vqa",
    "subsets": "datasets.subsets",
    "config": "causal_trace.config",
    "procedures": "causal_trace.procedures",
    "blip2_noise": "causal_trace.prompt_noise",
    "clean": "causal_trace.clean",
    "targets": "causal_trace.targets",
    "corrupted": "causal_trace.corrupted",
    "exact": "causal_trace.exact",
    "estimates": "causal_trace.estimates",
    "qk_fix": "causal_trace.qk_fix",
    "cost": "causal_trace.cost",
    "results": "causal_trace.results",
    "sharpen": "causal_trace.sharpen",
    "captioning": "causal_trace.captioning",
    "patterns": "causal_trace.patterns",
    "noise_level": "causal_trace.noise_level",
    "tracing": "causal_trace.tracer",
    "plotting": "causal_trace.plots",
    "aggregate": "causal_trace.averages",
    "edges": "attention_knockout.edges",
    "knockout": "attention_knockout.knockout",
    "knockout_result": "attention_knockout.result",
    "knockout_sweep": "attention_knockout.sweep",
    "knockout_plots": "attention_knockout.plots",
    "sweep": "sweeps.sweep",
    "sweep_plots": "sweeps.plots",
}

#: Module of the 0.3 layout that is now several -> those modules.
SPLIT: dict[str, tuple[str, ...]] = {
    "engine": ("models.attention", "models.blip.stacks", "models.blip2.qformer", "models.blip2.decoders",
               "models.blip2.t5", "models.runs", "models.chunks"),
    "blocks": ("causal_trace.blocks.base", "causal_trace.blocks.blip", "causal_trace.blocks.blip2",
               "causal_trace.blocks.vision", "causal_trace.blocks.registry"),
}


def new_path(old: str) -> str | None:
    """The module that ``old`` (a full dotted path) now is, or None where it did not move."""
    prefix = PACKAGE + "."
    if not old.startswith(prefix) or old[len(prefix):] not in MOVED:
        return None
    return prefix + MOVED[old[len(prefix):]]


def _merged(name: str, parts: tuple[str, ...]) -> ModuleType:
    """One module with the public names of ``parts``, as the 0.3 module that was split into them."""
    module = ModuleType(name, f"Moved: see {', '.join(PACKAGE + '.' + part for part in parts)}.")
    for part in parts:
        new = importlib.import_module(f"{PACKAGE}.{part}")
        module.__dict__.update({key: value for key, value in vars(new).items() if not key.startswith("_")})
    return module


class _Split(importlib.abc.Loader):
    def __init__(self, parts: tuple[str, ...]) -> None:
        self.parts = parts

    def create_module(self, spec: Any) -> ModuleType:
        where = ", ".join(PACKAGE + "." + part for part in self.parts)
        warnings.warn(f"{spec.name} was split into {where}: import each name from its module (the old path goes in the "
                      "next release)", DeprecationWarning, stacklevel=8)
        return _merged(spec.name, self.parts)

    def exec_module(self, module: ModuleType) -> None:
        """The module is built whole by :meth:`create_module`."""


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.target}: import it from there (the old path goes in the next "
                      "release)", DeprecationWarning, stacklevel=8)
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed."""


class OldPaths(importlib.abc.MetaPathFinder):
    """Finds a module of the 0.3 layout by its old path and gives the module it now is."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.removeprefix(PACKAGE + ".")
        if fullname.startswith(PACKAGE + ".") and old in SPLIT:
            return importlib.util.spec_from_loader(fullname, _Split(SPLIT[old]))
        new = new_path(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put :class:`OldPaths` on ``sys.meta_path`` once."""
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(OldPaths())
