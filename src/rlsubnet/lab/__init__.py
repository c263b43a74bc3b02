"""The lab: tiny language models built offline, synthetic tasks with exact rewards, and TRL training stages.

Needs the ``train`` extra (transformers, trl, datasets, accelerate), imported where it is used, so that
``rlsubnet --help`` never loads it.

- ``tokenizer``: character-level Hugging Face tokenizer with a real <unk>.
- ``model``: tiny Llama models by size (micro, small ≈ 1M, medium ≈ 4M); bf16 / fp32 checkpoints.
- ``tasks``, ``rewards``: 2-digit addition and subtraction, fixed held-out splits, exact-match reward.
- ``pretrain``: θ0 (SFT from scratch until a validation accuracy target) and θ0's own samples.
- ``config``: :class:`~rlsubnet.lab.config.StageSpec` and :class:`~rlsubnet.lab.config.DemoConfig` (the CLI's
  options are generated from them); ``data``: a stage's training rows.
- ``stages``: :func:`~rlsubnet.lab.stages.run_stage`, one TRL trainer per stage, with hooks for a masked optimizer
  and extra callbacks; ``trainers``: how every run (stages and pretraining) configures TRL's trainers.
- ``subnet``: the demo's subnetwork experiments: masked re-runs, baselines, the masks.
- ``measure``: every measurement of the demo; ``report``: report.md and the figures, rendered from results.json.
- ``runfolder``, ``scheduler``, ``pipeline``: the demo's output folder, its worker processes, and the whole run
  top to bottom (``rlsubnet demo``).
"""
