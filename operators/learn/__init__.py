"""Merges that learn from data: one room for everything that reads the tasks' inputs to merge better.

- :mod:`operators.learn.statistics`: the statistics data-driven methods read (RegMean's Gram matrices,
  Fisher merging's diagonal Fisher), computed beside each expert on its own training inputs;
- :mod:`operators.learn.search`: one merge parameter chosen on held-out validation slices;
- :mod:`operators.learn.coefficients`: AdaMerging's trainer (layer- or task-wise coefficients learned by
  entropy minimisation on unlabeled inputs);
- :mod:`operators.learn.heads`: each task's head refit, without labels, to the merged body.

What a method needs is declared where it is registered (``register(..., statistics="gram")``,
``register(..., inputs="unlabeled")``), so a data-driven method is one file in ``operators/merge/`` plus
its registration; this room computes what the registration asks for.
"""
