"""Merge methods (one file each) and the streaming merge engine.

Importing this package registers every method in ``MERGE_METHODS``.
"""

from operators.merge import (  # noqa: F401  (registers the methods)
    adamerging,
    arcee_fusion,
    breadcrumbs,
    cart,
    consensus,
    dare,
    della,
    fisher,
    iso_c,
    iso_cts,
    karcher,
    knots,
    linear,
    lines,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv_m,
    wudi,
)
from operators.merge.registry import (
    MERGE_METHODS,
    MergeMethod,
    MergeParams,
    TensorContext,
    get_method,
    register,
    resolve_weights,
    validate_merge_params,
)

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "MergeParams",
    "TensorContext",
    "get_method",
    "register",
    "resolve_weights",
    "validate_merge_params",
]
