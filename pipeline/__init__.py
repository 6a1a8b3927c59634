"""The mergeflow engine: spec, runtime, store, lineage, strategies, CLI."""

from operators import __version__

__all__ = ["__version__"]
