"""Round strategies: readable loops over the operators, run through the runtime.

Each module exposes ``run(rounds, base) -> list[RoundResult]``.
"""

from pipeline.strategies import oneshot

STRATEGY_RUNNERS = {"oneshot": oneshot.run}

__all__ = ["STRATEGY_RUNNERS"]
