"""The Prometheus exporter: one more view over the Sample stream.

metrics.py names every metric (the one table docs/metrics.md is made from),
collector.py turns Samples into cumulative series, server.py serves them.
text.py writes the exposition formats. Nothing here imports the engine, the
collectors or the UI: only pctop.model, and nothing outside the standard library.
"""
