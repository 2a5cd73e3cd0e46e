"""Causal tracing: its configuration and procedures, the blocks it restores, the clean and corrupted runs, exact
and estimated scores, results with their statistics, sharpening, averages and figures."""
