"""``python -m blip_trace_widgets`` runs the ``blip-trace`` command line."""
import sys

from .cli import main

sys.exit(main())
