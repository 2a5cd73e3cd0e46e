"""What every ``blip-trace`` subcommand shares: the one-line usage error, the parser, options built from a
configuration's fields, the progress bar, the output folder's check.

    >>> from blip_trace_widgets.core.command_line import slug
    >>> slug("What colour is the shape?")
    'what-colour-is-the-shape'
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import BlipTraceError


class UsageError(BlipTraceError):
    """A problem with the user's input: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line and a pointer to --help, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "trace"


def progress_bar(total_traces: int):
    from tqdm.auto import tqdm

    return tqdm(total=total_traces, unit="trace", file=sys.stderr, disable=None)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model``: a bundled demo, a local folder or a hub id (the names every subcommand shares)."""
    from .names import DEMO_MODELS, HUB_MODELS

    parser.add_argument("--model", default="demo", help=f"{', '.join(DEMO_MODELS)}, a local folder, or a hub id such "
                        f"as {', '.join(HUB_MODELS.values())} (default: %(default)s)")


def add_device_options(parser: argparse.ArgumentParser, device_default: str = "cuda if present, else cpu", *,
                       dtype: bool = True) -> None:
    """``--dtype`` (unless ``dtype=False``: a command whose models keep their own) and ``--device``, as every
    subcommand that loads a model takes them."""
    from .names import DTYPES

    if dtype:
        parser.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32)")
    parser.add_argument("--device", default=None, help=f"torch device, e.g. cpu or cuda (default: {device_default})")


def add_out_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--out``, a folder (required) for ``what``."""
    parser.add_argument("--out", required=True, help=f"folder for {what}")


def check_out(out: str) -> None:
    """--out must be a folder (made when missing), not a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out!r} is a file: name a folder to write the results into")


def add_config_options(parser: argparse.ArgumentParser, names: Sequence[str], settings: Any) -> None:
    """One option per field of ``settings`` (a configuration class) in ``names``, built
    from the field's help, choices, type and default. Each option's value is None unless given: the configuration
    keeps its own default."""
    from .options import OLD_FLAGS, option_spec

    for name in names:
        flag, kind, choices, help = option_spec(settings, name)
        flags = (flag, *OLD_FLAGS.get(name, ()))
        if kind is bool:  # a switch: given or not (None keeps the configuration's default)
            parser.add_argument(*flags, dest=name, action="store_const", const=True, default=None, help=help)
            continue
        parser.add_argument(*flags, dest=name, type=kind, choices=choices, default=None, help=help)


def config_fields(args: argparse.Namespace, settings: Any, **given: Any) -> dict[str, Any]:
    """The fields of ``settings`` (a configuration class) the command line sets: every option named like a field,
    as :func:`add_config_options` built it, then ``given`` (values the command line spells its own way). A field
    left at None keeps the configuration's default."""
    from .options import given_fields

    return given_fields(settings, vars(args), **given)
