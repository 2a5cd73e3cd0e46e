"""Causal tracing over a dataset: incremental Parquet, resume, sharding, and its figures."""
