"""The foundation: what every other floor stands on.

Configuration (YAML, inheritance, overrides, provenance), the experiment's artefact
paths, the typed `data`/`train` settings, the runtime (devices, ranks, precision, CPU
threads, seeds), progress lines, locks and the competition's metrics. Nothing here
imports another floor of the project: `data/` and `models/` build on it.
"""
