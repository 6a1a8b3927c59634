"""Recurring merge rounds: a continual ColD Fusion service with a promotion gate.

Contributors keep dropping new task data (or finished experts) into the spec's contributions
folder; each round (``mergeflow round``) fine-tunes the new contributions from the current
champion, fuses them (ColD Fusion), scores the result on a fixed gate suite, and promotes it only
if the gate passes. ``mergeflow schedule`` fires rounds on the spec's schedule;
``mergeflow history`` shows every round.

Modules: ``contributions`` (find, check and prepare what came in), ``gate`` (the promotion rule),
``state`` (what is done, in the store), ``round`` (one round), ``history``, ``scheduler`` (the
embedded APScheduler), ``emit`` (manifests for cluster schedulers).
"""
