"""The ``mergeflow`` command line.

    mergeflow validate SPEC                  check a spec (and its data and base model) without running
    mergeflow run SPEC [--address ADDR]      run a workflow; prints progress and an accuracy table
    mergeflow status [RUN_ID]                recent workflow runs, or one run's tree and artifacts
    mergeflow resume RUN_ID                  finish a stopped or killed workflow from its run (spec from MLflow)
    mergeflow export CKPT TASK OUT           write a stand-alone HF checkpoint for one task
    mergeflow lm-eval CKPT --tasks T         score a causal LM with lm-evaluation-harness
    mergeflow merge CONFIG OUT               merge checkpoints (mergeflow or mergekit YAML config)
    mergeflow compare SPEC [--seeds 0,1,2]   strategies × merges at the same budget: table and plot
    mergeflow compose SPEC --target T --out D  weigh the other tasks' experts for T from a few examples (LoraHub)
    mergeflow ui SPEC [--port 5000]          the MLflow UI on SPEC's tracking store, with links to the last run
    mergeflow submit SPEC --address URL      run SPEC as a Ray job on a cluster; prints the job id
    mergeflow jobs --address URL             the cluster's mergeflow jobs: status, workflow
    mergeflow logs JOB [--follow]            a job's driver output (as it comes, with --follow)
    mergeflow stop JOB                       stop a job; its runs end KILLED
    mergeflow contribute SPEC SOURCE --task T  add a contribution for the next recurring round
    mergeflow round SPEC                     run the next recurring round now (idempotent)
    mergeflow schedule SPEC [--emit kubernetes]  rounds on the spec's schedule, or cluster manifests
    mergeflow history SPEC                   every recurring round: contributions, gate verdict, champion
    mergeflow gc SPEC [--dry-run]            remove old rounds' checkpoints nothing needs (never a registered one)

Exit codes: 0 success; 1 the workflow failed while running; 2 bad input (spec, data, model).

One module per verb group, each adding its commands to the group ``main`` (``group.py``):
``run`` (validate, run, resume, compare, compose), ``inspect`` (status, ui, export), ``score`` (lm-eval), ``merge``, ``cluster``
(submit, jobs, logs, stop), ``recurring`` (contribute, round, schedule, history) and ``store`` (gc); what they share
(exit codes, one-line errors, spec loading, console) is in ``common``. A Ray job starts in
``job_entry``. No module here imports MLflow: runs are read through ``pipeline.lineage``.
"""

from __future__ import annotations

from pipeline.cli import cluster, inspect, merge, recurring, run, score, store  # noqa: F401  (importing one registers its verbs)
from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_FAILED
from pipeline.cli.group import main

__all__ = ["EXIT_BAD_INPUT", "EXIT_BUSY", "EXIT_FAILED", "main"]
