"""The ``blip-trace`` command line (also ``python -m blip_trace_widgets``).

    blip-trace demo --out trace-output
    blip-trace trace --model demo --image cat.png --question "what color is the cat?" --out out/
    blip-trace trace --model demo-caption --image cat.png --out out/          # every word of the caption
    blip-trace trace --model demo-itm --image cat.png --text "a red circle" --out out/
    blip-trace sweep --dataset easy-vqa-color --limit 50 --model demo --out sweep-output
    blip-trace knockout --image cat.png --question "what color is the cat?" --edges image --edges cls --out out/
    accelerate launch --multi_gpu --num_processes 2 -m blip_trace_widgets sweep --dataset coco-qa-color ...
    blip-trace lens --image cat.png --question "what color is the cat?" --block answer_decoder --out out/
    blip-trace circuit --image cat.png --question "what color is the cat?" --method eap-ig --top 50 --out out/
    blip-trace circuit --dataset easy-vqa-color --limit 30 --method eap-ig --out out/   # averaged over questions

Each trace writes a PNG heatmap and a JSON result (``TraceResult.load`` reads it back),
named after the question, the image and the configuration, so runs never overwrite each
other. A user's mistake (bad arguments, a missing file, a model that cannot be loaded)
prints one line and exits with status 2; anything else is a bug or an environment
problem, and prints its full traceback (exit status 1).

Each subcommand lives with its method: ``demo`` and ``trace`` in :mod:`.causal_trace.command`, ``sweep`` in
:mod:`.sweeps.command`, ``knockout`` in :mod:`.attention_knockout.command`, ``lens`` in :mod:`.lenses.command` and
``circuit`` in :mod:`.circuits.command`; what they share (options built from a configuration's fields, the one-line
usage error) is :mod:`.core.command_line`. This module puts them together and runs one.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .attention_knockout.command import add_knockout_parser
from .causal_trace.command import add_trace_parsers
from .core.command_line import Parser
from .core.errors import BlipTraceError
from .sweeps.command import add_sweep_parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="blip-trace", description="Causal tracing of BLIP (ROME-style): visual question answering, "
                     "captioning and image-text matching.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    add_trace_parsers(sub)
    add_sweep_parser(sub)
    add_knockout_parser(sub)
    from .lenses.command import add_parser as add_lens_parser

    add_lens_parser(sub)
    from .circuits.command import add_parser as add_circuit_parser

    add_circuit_parser(sub)
    return parser


#: Errors from the operating system that name a path the user gave: their fix is the user's.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .core.threads import use_sensible_threads

        use_sensible_threads()  # fewer threads than cores when other work is running (unless OMP_NUM_THREADS is set)
        return args.run(args)
    except (BlipTraceError, *USER_OS_ERRORS) as error:  # a user's mistake: one line (any other error: a traceback)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"blip-trace: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `blip-trace ... | head`: the reader left; end quietly
        import os

        try:  # point stdout at /dev/null, so that Python's final flush does not complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
