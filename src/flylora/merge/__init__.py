"""Multi-task merging and interference analysis of low-rank adapters, pure math.

Knows nothing about training or data: a task adapter is {module_name: LowRankDelta(B, A, scale)}
with ΔW = scale · B · A; merges are exact in ΔW space (FlyLoRA paper Eq. 12 and friends).
"""
from flylora._lazy import lazy_attributes

# public name -> the submodule that defines it, imported on first access (PEP 562), so that importing
# a submodule (`flylora merge --help` imports flylora.merge.cli) does not import torch
_EXPORTS = {
    "LowRankDelta": "deltas", "check_task_adapters": "deltas", "delta_weight": "deltas",
    "delta_weights": "deltas", "factors_from_peft_model": "deltas",
    "cosine_summary": "interference", "cross_projection_norms": "interference",
    "cross_projection_summary": "interference", "jl_distance_ratios": "interference", "jl_summary": "interference",
    "linear_cka": "interference", "mean_cosine_matrix": "interference", "pairwise_cosines": "interference",
    "predicted_cross_entry_var": "interference", "predicted_cross_frobenius": "interference",
    "row_nonzeros": "interference",
    "lora_config_for": "io", "lora_state_dict": "io", "merged_full_weights": "io", "save_peft_lora_adapter": "io",
    "dare": "methods", "knots": "methods", "knots_lowrank": "methods", "legacy_separate_average": "methods",
    "svd_truncate": "methods", "task_arithmetic": "methods", "task_arithmetic_lowrank": "methods",
    "ties": "methods", "weight_average": "methods", "weight_average_lowrank": "methods",
    # model-level pipeline: routed union artifacts, the merge API behind `flylora merge`, analysis glue
    "is_routed_union": "union", "load_routed_union": "union", "write_routed_union": "union",
    "merge_adapters": "cli",
    "interference_report": "analysis", "load_task_factors": "analysis", "resolve_inputs": "analysis",
    "plot_cosine_heatmap": "plots", "plot_merge_drops": "plots",
}

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


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, set(_EXPORTS.values()), globals())
