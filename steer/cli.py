"""The ``steer`` command: a thin dispatcher to the ``main(argv)`` of each subcommand's module.

Each subcommand lives beside the code it drives and is imported only when called, so that
``steer --help`` stays fast and ``steer exact`` never imports diffusers.

Bad input ends in one line ``steer <cmd>: error: ...`` and exit status 2, never a traceback: a
:class:`~steer.config.ConfigError`, or a ``ValueError`` / ``TypeError`` / ``KeyError`` /
``OSError`` raised while the subcommand checks its input and sets up (inside
:func:`steer.config.input_phase`). An exception of the work itself (a training step, a sampler)
keeps its traceback; ``STEER_TRACEBACK=1`` shows the traceback of bad input too. The line is
drawn in docs/reliability.md.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

from steer.config import ArgumentParser, exit_on_input_error

# name -> (module exposing ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "exact": (
        "steer.discrete.suite",
        "exact checks of the MaxEnt-RL theorems (§4) on enumerable DAGs",
    ),
    "toy": ("steer.toy.cli", "train / evaluate diffusion samplers of unnormalised densities"),
    "rewards": ("steer.rewards.cli", "list the reward registry"),
    "finetune": ("steer.train.cli", "fine-tune a diffusion model (default: the digits job)"),
    "pretrain-digits": ("steer.digits.prior", "train the embedded digits prior and classifier"),
    "posterior": (
        "steer.digits.reference",
        "exact samples of a config's posterior by rejection from its prior; log Z",
    ),
}


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="steer",
        description="Steer pretrained diffusion models toward a reward or a target density.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        parser.error(f"unknown command {command!r}; {hint}choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return exit_on_input_error(f"steer {command}", lambda: int(module.main(rest) or 0))


if __name__ == "__main__":
    sys.exit(main())
