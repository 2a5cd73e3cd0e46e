"""Configuration fields that are also command-line options: a field carries its help, choices and parsed type, and
the command line builds its options from them, so a name, a default and its help have one home.

    >>> from dataclasses import dataclass
    >>> from blip_trace_widgets.core.options import field_default, option, option_spec
    >>> @dataclass(frozen=True)
    ... class Settings:
    ...     samples: int = option(default=10, type=int, help="noise samples")
    >>> option_spec(Settings, "samples")
    ('--samples', <class 'int'>, None, 'noise samples (default: 10)')
    >>> field_default(Settings, "samples")
    10
"""
from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any

from .errors import BlipTraceError

#: Older spellings an option still accepts.
OLD_FLAGS: dict[str, tuple[str, ...]] = {"word": ("--target",)}


def option(*, help: str = "", choices: Any = None, type: Any = str, **kw: Any) -> Any:
    """A dataclass field with what its command-line option needs: its help, its choices and the type it parses to
    (``bool``: a switch). Other metadata (``metadata={...}``) is kept beside them."""
    metadata = {**kw.pop("metadata", {}), "help": help, "choices": choices, "type": type}
    return field(metadata=metadata, **kw)


def field_default(cls: Any, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (calling its factory); MISSING-free fields only."""
    spec = {f.name: f for f in fields(cls)}[name]
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    raise BlipTraceError(f"{cls.__name__}.{name} has no default: pass it")


def option_spec(cls: Any, name: str) -> tuple[str, Any, Any, str]:
    """``(flag, type, choices, help)`` of field ``name``'s option, the help ending in its default."""
    spec = {f.name: f for f in fields(cls)}[name]
    meta = spec.metadata
    if not meta.get("help"):
        raise BlipTraceError(f"{cls.__name__}.{name} has no help text for its command-line option: give it help=...")
    default = spec.default
    said = "" if default is MISSING or default is None or "(default" in meta["help"] else f" (default: {default})"
    return "--" + name.replace("_", "-"), meta["type"], meta["choices"], meta["help"] + said


def given_fields(cls: Any, values: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The fields of ``cls`` that ``values`` (parsed options) sets, None meaning "not given, keep the default", then
    ``given`` (values spelt another way)."""
    return {**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None}, **given}
