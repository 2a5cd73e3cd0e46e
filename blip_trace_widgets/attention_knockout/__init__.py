"""Attention knockout: the edges it cuts, the runs, its results, sweeps over questions and figures."""
