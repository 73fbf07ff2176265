"""The README's routing-bias cadence comparison (benchmarks/bias_cadence.json):
FlyLoRA bias_update_every "step" vs "micro_batch" on the embedded SmolLM2-135M, cloze:arc_e
carved-train (24 steps, micro-batch 4 x accumulation 4) -> carved-test (100 questions, loglik,
routing recorded). One JSON per run under OUT; rerunning skips finished runs.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/bias_cadence.py 0,1,2 step,micro_batch [OUT]
"""
import json, sys, time
from pathlib import Path
import torch
OUT = Path(sys.argv[3] if len(sys.argv) > 3 else "runs/bias_cadence")
def main(seeds, cadences):
    from flylora.pipeline.train import train
    from flylora.evaluation.evaluate import evaluate
    from flylora.balance import record_routing, routing_stats
    from flylora.models import load_model, load_tokenizer
    from peft import PeftModel
    import flylora
    torch.set_num_threads(1)
    for seed in seeds:
        for cad in cadences:
            name = f"{cad}_s{seed}"
            OUT.mkdir(parents=True, exist_ok=True)
            res_path = OUT / f"{name}.json"
            if res_path.exists():
                continue
            t0 = time.time()
            recipe = {
                "name": name,
                "model": {"name_or_path": "embedded:smollm2-135m-instruct"},
                "method": {"name": "flylora", "config": {"r": 32, "k": 8, "lora_alpha": 64, "bias_update_rate": 1e-3,
                                                          "bias_update_every": cad}},
                "data": {"task": "cloze:arc_e", "split": "carved-train", "cutoff_len": 128, "train_on_inputs": False},
                "train": {"lr": 1e-3, "max_steps": 24, "micro_batch_size": 4, "gradient_accumulation": 4,
                          "warmup_ratio": 0.1, "precision": "bf16", "logging_steps": 4, "save_steps": 1000, "seed": seed},
                "output": {"dir": str(OUT / "runs" / name), "progress": False, "tensorboard": False, "overwrite": True},
            }
            run_dir = train(recipe)
            train_s = time.time() - t0
            info = json.loads((run_dir / "run.json").read_text())
            tok = load_tokenizer("embedded:smollm2-135m-instruct")
            base = load_model("embedded:smollm2-135m-instruct")
            model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
            routing_stats(model, reset=True)
            with record_routing(model):
                rep = evaluate(["cloze:arc_e"], model=model, tokenizer=tok, split="carved-test", limit=100,
                               mode="loglik", batch_size=16, bf16_autocast=True, progress=False, threads=1)
            stats = [s for s in routing_stats(model).values() if s["tokens"] > 0]
            ratios = [s["entropy"] / s["max_entropy"] for s in stats]
            dabs = [sum(abs(b) for b in s["bias"]) / len(s["bias"]) for s in stats]
            # max load share / (k/r): 1 = even
            peak = [max(s["load"]) * 32 for s in stats]
            out = {"name": name, "cadence": cad, "seed": seed, "score": rep["results"][0]["score"],
                   "eval_entropy_mean": sum(ratios) / len(ratios), "eval_entropy_min": min(ratios),
                   "eval_peak_load_mean": sum(peak) / len(peak),
                   "train_routing": info["routing"], "mean_abs_d": sum(dabs) / len(dabs),
                   "final_loss": info["train"]["final_loss"], "train_s": round(train_s, 1),
                   "total_s": round(time.time() - t0, 1)}
            res_path.write_text(json.dumps(out, indent=1))
            print(json.dumps(out), flush=True)
if __name__ == "__main__":
    main([int(s) for s in sys.argv[1].split(",")], sys.argv[2].split(","))
