"""Evaluating models and adapters on tasks (flylora.tasks). Nothing is imported here; import the
modules:

  evaluate    the API: evaluate(tasks, model, adapters, ...), evaluate_task, results.json/md, outputs
  inference   batched generation and multiple-choice log-likelihoods
  samples     HumanEval without a model: score completions from a file, or the reference solutions
  options     option checks (ignored options are errors) and split defaults from the adapters' runs
  cli         `flylora eval`
"""
