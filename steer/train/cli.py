"""``steer finetune [--config FILE] [a.b=value ...]``: the same ``main(cfg)`` as the script.

With no argument it runs the main job: RTB on the embedded digits prior toward a digit class.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from steer.train.config import load_config


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="steer finetune",
        description="Fine-tune a diffusion model toward a reward (TB, RTB, DB, DDPO, DPOK). "
        "With no arguments: RTB on the embedded digits prior.",
    )
    parser.add_argument("--config", default=None, help="a YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.steps=10")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    cfg = load_config(args.config, args.overrides)
    from steer.train.loop import main as run

    run(cfg)
    return 0
