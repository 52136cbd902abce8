"""Collectors. A source knows nothing of views; it returns typed readings
(pctop.sources.readings) once per interval and the Stats aggregator
(pctop.stats) turns them into one immutable pctop.model.Sample."""
