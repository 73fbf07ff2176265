"""`flylora bench` smoke test: the tiny model only, in-process, a few seconds. It checks that the
bench runs end to end and writes the JSON keys the issue asks for; it never checks speed (speed
targets belong to `make bench` and benchmarks/RESULTS.md, not to tests)."""
from __future__ import annotations

import argparse
import json
import math

import torch

from flylora.bench import cli as bench

KEYS = (
    "step_time_ratio_vs_lora_r8",
    "step_time_ratio_vs_frozen_base",
    "peak_memory_ratio_vs_lora_r8",
    "adapter_size_ratio_vs_lora_r32",
    "bias_update_share_of_step",
)


def test_bench_smoke_writes_finite_positive_ratios(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    assert bench.run(parser.parse_args(["--smoke", "--json", str(path)])) == 0
    assert torch.get_num_threads() == threads  # the bench restores the caller's thread count
    result = json.loads(path.read_text())
    for key in KEYS:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert set(result["models"]["tiny"]["methods"]) == set(result["settings"]["methods"])
    union = result["models"]["tiny"]["routed_union"]
    assert [union[f"T={t}"]["ratio_vs_frozen_base"]["median"] > 0 for t in union["tasks"]] == [True] * 4
    assert "step ×lora_r8" in capsys.readouterr().out  # the ratio table was printed
