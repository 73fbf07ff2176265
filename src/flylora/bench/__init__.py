"""`flylora bench`: FlyLoRA against PEFT LoRA, the sibling methods and the frozen base, on this machine.

One run measures every (model, method) pair under the same conditions and reports RATIOS, since
absolute CPU times say little outside this machine:

  step      one training step: forward + backward + AdamW step (+ FlyLoRA's routing-bias update)
  memory    peak bytes live during one training step (see `peak_step_memory`)
  infer     one no-grad forward over the same batch, adapters unmerged (eval mode)
  adapter   bytes of `adapter_model.safetensors` written by `save_pretrained`
  bias      `update_routing_bias(model)` alone, as a share of the FlyLoRA step that contains it
  union     inference with T FlyLoRA task adapters active at once (`base_model.set_adapter([...])`)
  tokens    (full run) peak training memory of FlyLoRA vs LoRA r8 at longer sequences

Methods (all on the same 7 projections q,k,v,o,gate,up,down, dropout 0 for all so the comparison
is of the methods, not of dropout masks): FlyLoRA r32/k8, PEFT LoRA r8 and r32, TopLoRA r8,
MoE-LoRA 20×4 top-10, and the frozen base. The frozen base has nothing to train, so its "step" is
the floor every adapter pays anyway: forward + backward w.r.t. the input embeddings (detached,
`requires_grad`), which back-propagates through every layer exactly as adapters in layer 0 need,
with no optimizer step.

Timing method. Each model's methods are built once (sharing the frozen base weights, so memory
stays small) and warmed up; then every repetition runs each method once, in a fresh random order,
back to back. A ratio is taken *within* a repetition (method / reference, timed seconds apart) and
the median over repetitions is reported with its IQR: load that drifts during the run slows both
sides of a pair, so paired ratios are far steadier than ratios of separate medians.

Clock and threads. By default one torch thread, timed by that thread's CPU time
(`time.thread_time`): what the step costs on a core of its own. The machine this was written on
has 2 cores shared with other people's test runs; with 2 threads and wall time, every op's
fork/join waits whenever the other core is taken, which inflates op-heavy methods (many small
adapter ops) more than GEMM-heavy ones: it biased ratios by up to ~40% in our runs, with IQRs of
tens of percent. The single-thread CPU clock gave IQRs of a few percent under the same load
(benchmarks/RESULTS.md has both). `--threads N`
(N > 1) times with the wall clock instead; use it on an idle machine. Process CPU time over
wall time is recorded per repetition as a contention check (about 1 per thread when idle).

Modules: cases (the models, the methods, one ready-to-step Runner per method), measure (the
interleaved paired timing and the allocator-level peak memory), phases (every phase on one
model: steps, memory, inference, adapter size, routed union, memory at more tokens), report
(machine info, headline ratios against the targets, the tables), cli (`flylora bench`), quant
(`flylora bench --quantized`), startup (`flylora --help` wall time).
"""
