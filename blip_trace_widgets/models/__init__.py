"""The model families: loading, task heads, the anatomy tables (the only place that knows module paths) and the
layer-by-layer stacks every method runs."""
