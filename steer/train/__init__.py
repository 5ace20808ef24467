"""The fine-tuner: ``steer finetune`` and ``accelerate launch scripts/finetune.py``.

- ``config``: the typed configuration (``FinetuneConfig`` and its sections), YAML + overrides.
- ``objectives``: one class per objective (tb, vargrad, rtb, db, subtb, ddpo, dpok), each
  declaring what it needs (``Needs``) and computing its per-step terms; ``register`` adds one.
- ``models``: the run's components from the config (pipeline, policy, frozen prior, reward).
- ``sampling`` / ``batch``: one rollout batch with what the objective declared it needs.
- ``run``: one step of training (rollouts, re-scored steps, the optimiser step); ``ppo``: the
  rounds of the on-policy baselines; ``replay``: the replay buffer.
- ``loop``: ``setup`` and ``main(cfg, callbacks)``, with checkpoints (``checkpoint``), the
  final evaluation and files (``outputs``), signals and ``log.report`` hooks.

The digits application (``steer.digits``) is reached only through the preset's names.
"""
