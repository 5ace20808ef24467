"""Fine-tune a diffusion model toward a reward; run with ``accelerate launch``.

    accelerate launch scripts/finetune.py --config configs/tiny_jpeg_tb.yaml train.steps=4

It is the same ``main`` as ``steer finetune``. A run interrupted (SIGTERM / Ctrl-C save a
checkpoint and stop; a crash leaves the last complete one) continues exactly where it was with
the same command, the same number of processes and
``log.run_name=<its folder> log.resume_from_checkpoint=latest``.
"""

import sys

from steer.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
