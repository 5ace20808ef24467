"""``steer finetune [--config FILE] [a.b=value ...]``: the same ``main(cfg)`` as the script.

With no argument it runs the main job: RTB on the embedded digits prior toward a digit class.
Bad input (the command line, the config, and what ``steer.train.loop.main`` finds while it sets
up: prompts, model, reward, the checkpoint to resume) ends in one line ``steer finetune: error:
...`` and status 2; an error of the training itself keeps its traceback (docs/reliability.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from steer.config import ArgumentParser, exit_on_input_error, input_phase
from steer.train.config import load_config

DEFAULT_PRESET = "digits_rtb"


def resolve_config(spec: str | None) -> Path:
    """A YAML path, or the name of a preset installed with steer (``digits_rtb``, ...)."""
    if spec is not None and Path(spec).is_file():
        return Path(spec)
    name = Path(spec or DEFAULT_PRESET).name.removesuffix(".yaml")
    preset = resources.files("steer.configs") / f"{name}.yaml"
    if not preset.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in resources.files("steer.configs")
                       .iterdir() if p.name.endswith(".yaml"))  # fmt: skip
        raise FileNotFoundError(
            f"config {spec!r} is neither a file nor a preset; give a YAML file or one of the "
            f"presets: {names}"
        )
    return Path(str(preset))


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="steer finetune",
        description="Fine-tune a diffusion model toward a reward (TB, RTB, DB, DDPO, DPOK). "
        "With no arguments: RTB on the embedded digits prior.",
    )
    parser.add_argument(
        "--config", default=None, help=f"a YAML file or a preset name (default: {DEFAULT_PRESET})"
    )
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.steps=10")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``steer finetune``: status 0, or 2 with one line on bad input."""
    return exit_on_input_error("steer finetune", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    with input_phase():
        args = parse(argv)
        cfg = load_config(resolve_config(args.config), args.overrides)
    from steer.train.loop import main as run

    run(cfg)  # marks the errors of its set-up as bad input, not those of the training
    return 0
