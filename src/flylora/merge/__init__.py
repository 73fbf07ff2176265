"""Multi-task merging and interference analysis of low-rank adapters, pure math.

Knows nothing about training or data: a task adapter is {module_name: LowRankDelta(B, A, scale)}
with ΔW = scale · B · A; merges are exact in ΔW space (FlyLoRA paper Eq. 12 and friends).
"""
from flylora.merge.deltas import (
    LowRankDelta,
    check_task_adapters,
    delta_weight,
    delta_weights,
    factors_from_peft_model,
)
from flylora.merge.interference import (
    cosine_summary,
    cross_projection_norms,
    cross_projection_summary,
    jl_distance_ratios,
    jl_summary,
    linear_cka,
    mean_cosine_matrix,
    pairwise_cosines,
    predicted_cross_entry_var,
    predicted_cross_frobenius,
    row_nonzeros,
)
from flylora.merge.io import lora_config_for, lora_state_dict, merged_full_weights, save_peft_lora_adapter
from flylora.merge.methods import (
    dare,
    knots,
    knots_lowrank,
    legacy_separate_average,
    svd_truncate,
    task_arithmetic,
    task_arithmetic_lowrank,
    ties,
    weight_average,
    weight_average_lowrank,
)

__all__ = [
    "LowRankDelta",
    "check_task_adapters",
    "cosine_summary",
    "cross_projection_norms",
    "cross_projection_summary",
    "dare",
    "delta_weight",
    "delta_weights",
    "factors_from_peft_model",
    "jl_distance_ratios",
    "jl_summary",
    "knots",
    "knots_lowrank",
    "legacy_separate_average",
    "linear_cka",
    "lora_config_for",
    "lora_state_dict",
    "mean_cosine_matrix",
    "merged_full_weights",
    "pairwise_cosines",
    "predicted_cross_entry_var",
    "predicted_cross_frobenius",
    "row_nonzeros",
    "save_peft_lora_adapter",
    "svd_truncate",
    "task_arithmetic",
    "task_arithmetic_lowrank",
    "ties",
    "weight_average",
    "weight_average_lowrank",
]

# model-level pipeline: routed union artifacts, the merge API behind `flylora merge`, analysis glue
from flylora.merge.union import is_routed_union, load_routed_union, write_routed_union  # noqa: E402
from flylora.merge.cli import merge_adapters  # noqa: E402
from flylora.merge.analysis import interference_report, load_task_factors, resolve_inputs  # noqa: E402
from flylora.merge.plots import plot_cosine_heatmap, plot_merge_drops  # noqa: E402

__all__ += [
    "interference_report",
    "is_routed_union",
    "load_routed_union",
    "load_task_factors",
    "merge_adapters",
    "plot_cosine_heatmap",
    "plot_merge_drops",
    "resolve_inputs",
    "write_routed_union",
]
