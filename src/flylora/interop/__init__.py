"""Interoperability: the official FlyLoRA checkpoint format (`official`), the refusal of direct
loads of official checkpoints (`detect`), and the lm-evaluation-harness entry (`lm_eval`).

Nothing heavy is imported here: the `flylora convert` / `flylora lm-eval` command modules import
torch, transformers and lm-eval inside their functions."""
