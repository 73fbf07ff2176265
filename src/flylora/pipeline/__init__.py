"""The training pipeline: recipes -> training runs -> experiments (train, evaluate, merge,
evaluate) -> the demo and the lr sweep. Nothing is imported here; import the modules:

  recipe            YAML training recipes, validated strictly (load_recipe, apply_overrides)
  trainer           what the HF Trainer is given: PEFT config, seeds, dataset, arguments, callbacks
  train             `flylora train`: one adapter in a locked, resumable run folder (train, load_run)
  checkpoints       complete-checkpoint markers, resume, recovery from a checkpoint at the end
  experiment_spec   the experiment spec: dataclasses, strict loading, per-run recipes
  experiment        run_experiment: every stage cached on disk, results.json
  summaries         mean ± std over seeds and merge drops, read from results.json
  demo              `flylora demo`: the CPU-scale multi-task experiment, theory checks, its report
  sweep             `flylora sweep`: an lr per method, chosen on carved-val, reported on carved-test
  sweep_report      the sweep's markdown report
"""
