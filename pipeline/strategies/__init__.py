"""Round strategies: readable loops over the operators, run through the runtime.

Each module exposes ``run(rounds, base) -> list[RoundResult]``.
"""

from pipeline.strategies import atm, cold_fusion, oneshot

STRATEGY_RUNNERS = {"oneshot": oneshot.run, "atm": atm.run, "cold_fusion": cold_fusion.run}

__all__ = ["STRATEGY_RUNNERS"]
