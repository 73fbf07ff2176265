"""`flylora convert`: official FlyLoRA checkpoints (gfyddha/FlyLoRA's PEFT fork) <-> flylora adapters.

    flylora convert --from official SRC --out DST      # official -> flylora FlyLoRA adapter
    flylora convert --to official SRC --out DST        # flylora FlyLoRA / LoRA-FA -> official
"""
from __future__ import annotations

import argparse

FORMATS = ("official",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="adapter folder to convert")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="from_format", choices=FORMATS,
                     help="SRC is in this format; write a flylora adapter")
    way.add_argument("--to", dest="to_format", choices=FORMATS,
                     help="SRC is a flylora adapter; write it in this format")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--base-model", default=None,
                   help="--to official: base model whose layer widths A needs (default: the adapter's "
                        "base_model_name_or_path; only its config is read)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    from .official import from_official, to_official

    if args.from_format == "official":
        if args.base_model:
            raise ValueError("--base-model is only used with --to official")
        s = from_official(args.src, args.out, overwrite=args.overwrite)
        print(f"official FlyLoRA {args.src} -> flylora adapter {s['out']}: {s['modules']} modules, r={s['r']}, "
              f"k={s['k']}, lora_alpha={s['lora_alpha']}, A kept exactly (save_projection, sparsity "
              f"{s['sparsity']:.4g}), bias_update_rate={s['bias_update_rate']:g}")
        print("note: the official code updates the routing bias in every forward (eval too); the converted "
              "adapter updates it once per training micro-batch (bias_update_every) and never in eval "
              "(docs/interop.md)")
    else:
        s = to_official(args.src, args.out, base_model=args.base_model, overwrite=args.overwrite)
        print(f"flylora adapter {args.src} -> official FlyLoRA {s['out']}: {s['modules']} modules, r={s['r']}, "
              f"top_k={s['k']}, lora_alpha={s['lora_alpha']}, bias_u={s['bias_u']:g}")
    return 0
