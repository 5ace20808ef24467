"""Fine-tune a diffusion model toward a reward; run with ``accelerate launch``.

    accelerate launch scripts/finetune.py --config configs/tiny_jpeg_tb.yaml train.steps=4

It is the same ``main`` as ``steer finetune``.
"""

import sys

from steer.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
