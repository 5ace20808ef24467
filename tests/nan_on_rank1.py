"""``scripts/finetune.py`` whose decoded samples turn NaN on process 1 from its second rollout on
(launched by tests/test_resume.py with ``accelerate launch``: one rank meets a non-finite value,
every rank must stop with the error; before the ranks agreed, this run hung)."""

import os
import sys

import steer.train.models as models
from steer.train.cli import main

_decoder = models._latent_decoder


def _nan_on_rank1(pipe):
    decode, calls = _decoder(pipe), [0]

    def wrapped(latents):
        calls[0] += 1
        images = decode(latents)
        return images * float("nan") if os.environ["RANK"] == "1" and calls[0] >= 2 else images

    return wrapped


models._latent_decoder = _nan_on_rank1

if __name__ == "__main__":
    sys.exit(main())
