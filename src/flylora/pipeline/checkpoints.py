"""Trainer checkpoints that are never taken as complete when they are not.

The HF Trainer writes `checkpoint-N/` in place: adapter, optimizer, scheduler, RNG states, and
`trainer_state.json` last. A kill or a full disk in between leaves a folder that
`get_last_checkpoint` still picks, and resuming from it fails on the missing file. Here:

- `CompleteMarker` (a TrainerCallback, on_save, after the Trainer wrote everything) fsyncs the
  checkpoint's files and then writes `flylora-complete.json`, so even a power loss cannot leave
  a marked checkpoint with empty files;
- `last_complete_checkpoint` walks `checkpoint-N` from the highest N down and takes the first
  complete one: marked, or (written before the marker existed, or killed between the Trainer's
  last write and the marker) a `trainer_state.json` that parses with this N as global_step and
  adapter weights that read back finite. Incomplete ones are reported (and removed by the caller:
  they are ours, inside our run folder, and the Trainer would otherwise count them in
  save_total_limit);
- `train_or_recover`: resuming from a checkpoint that already reached max_steps (a crash after
  the final checkpoint, before or after the final adapter, but before run.json) must not train
  again: the Trainer would take one extra step (global_step 5 of max_steps 4). The checkpoint's
  adapter and state are loaded instead and training is not re-entered.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

COMPLETE = "flylora-complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _weights(folder: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """None when `folder` is a complete checkpoint, else what is wrong with it (a few words)."""
    folder = Path(folder)
    m = _CKPT.match(folder.name)
    if (folder / COMPLETE).is_file():
        return None
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        return "no trainer_state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is truncated"
    if m and state.get("global_step") != int(m.group(1)):
        return f"trainer_state.json says global_step {state.get('global_step')}"
    weights = _weights(folder)
    if weights is None:
        return "no adapter weights"
    from ..loading import AdapterLoadError, check_weights_file

    try:
        check_weights_file(str(weights))
    except AdapterLoadError as e:
        return str(e)
    return None


def last_complete_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[str | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(incomplete newer checkpoint, why)])."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, []
    found = sorted(((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                    if p.is_dir() and (m := _CKPT.match(p.name))), reverse=True)
    skipped: list[tuple[Path, str]] = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), skipped
        skipped.append((path, problem))
    return None, skipped


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def complete_marker_callback():
    """A TrainerCallback that fsyncs each saved checkpoint and marks it complete (rank 0)."""
    from ..fsutil import _fsync_tree, atomic_write_json

    class CompleteMarker(_trainer_callback_base()):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its RNG state
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    _fsync_tree(folder)
                    atomic_write_json(folder / COMPLETE, {"global_step": state.global_step})
            return control

    return CompleteMarker()


def finished_state(checkpoint: str | None) -> dict | None:
    """The checkpoint's trainer state when it already reached max_steps, else None."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    max_steps = state.get("max_steps") or 0
    return state if max_steps > 0 and state.get("global_step", 0) >= max_steps else None


def train_or_recover(trainer, resume: str | None):
    """`trainer.train(resume_from_checkpoint=resume)`, unless `resume` already holds the end of
    training: then its adapter and state are loaded and a TrainOutput is returned without a step."""
    state = finished_state(resume)
    if state is None:
        try:
            return trainer.train(resume_from_checkpoint=resume)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the complete checkpoints in {trainer.args.output_dir} are kept; the same "
                                    "command resumes from the last one") from None
        except Exception as e:  # torch.save on a full disk is a RuntimeError: say it in one line
            from ..fsutil import disk_full_error

            full = disk_full_error(e, trainer.args.output_dir)
            if full is not None:
                raise full from None
            raise
    from peft import set_peft_model_state_dict
    from transformers.trainer_utils import TrainOutput

    from ..loading import check_weights_file

    weights = _weights(Path(resume))
    check_weights_file(str(weights))
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(weights))
    else:
        import torch

        sd = torch.load(str(weights), map_location="cpu", weights_only=True)
    result = set_peft_model_state_dict(trainer.model, sd)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {resume!r} does not fit this adapter (unexpected {unexpected[:3]})")
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    # the Trainer's train_loss is the mean step loss; logged losses are means over their intervals
    losses, prev, total = [], 0, 0.0
    for h in trainer.state.log_history:
        if "loss" in h and "step" in h:
            total += h["loss"] * (h["step"] - prev)
            prev = h["step"]
            losses.append(h["loss"])
    loss = total / prev if prev else float("nan")
    print(f"{resume} already holds the end of training (global_step {state['global_step']} of "
          f"{state['max_steps']}): finishing the run from it without another step", flush=True)
    return TrainOutput(state["global_step"], loss, {"train_loss": loss, "recovered_from": resume})
