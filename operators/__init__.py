"""Units of work that run anywhere: fine-tune, merge, evaluate, checkpoint and tensor I/O.

Nothing in this package imports Ray or MLflow: every operator runs in-process, and the pipeline
wraps them as Ray tasks and records their lineage at the edges.
"""

__version__ = "0.1.0"
