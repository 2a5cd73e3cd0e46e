"""What every other part stands on: errors, names and defaults, inputs, image regions, token roles, scores,
paired statistics, caches, memory and threads. Imports nothing else of the package."""
