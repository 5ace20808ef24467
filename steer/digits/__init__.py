"""The digits application: the embedded default of ``steer finetune``, built on the library.

A small DDPM prior (``prior``, trained by ``pretrain``) and a CNN classifier (``classifier``, also
the ``digits-classifier`` reward) on scikit-learn's handwritten digits, both trained on first use
into the cache (``cache``); the exact posterior ∝ prior · p(c | x)^(1/β) by rejection
(``reference``); the end-of-run report against it (``report``, the preset's ``log.report``); the
rejection fine-tuning baseline (``rejection_ft``). The trainer reaches it only through the
preset's ``model.pretrained: digits``, ``reward.name`` and ``log.report`` entries.
"""
