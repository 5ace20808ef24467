"""``steer rewards``: print the reward registry as a table (name, differentiable, input size,
prompts, source), without building any model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .registry import RewardSpec, specs, test_kwargs

__all__ = ["main", "table"]


def _size(s: RewardSpec) -> str:
    return "any" if s.input_size is None else f"{s.input_size[0]}x{s.input_size[1]}"


def table(markdown: bool = True) -> str:
    """The registry as a markdown (or plain aligned) table."""
    header = ["name", "differentiable", "input size", "prompts", "source"]
    rows = [
        [
            s.name,
            "yes" if s.differentiable else "no",
            _size(s),
            "yes" if s.needs_prompts else "no",
            s.source,
        ]
        for s in specs()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def main(argv: Sequence[str] | None = None) -> int:
    if list(argv or [])[:1] == ["verify"]:  # steer rewards verify NAME --weights PATH
        from .verify import main as verify_main

        return verify_main(list(argv or [])[1:])
    parser = argparse.ArgumentParser(
        prog="steer rewards", description="List the reward registry (builds no model)."
    )
    parser.add_argument("--plain", action="store_true", help="aligned text instead of markdown")
    parser.add_argument("--json", action="store_true", help="one JSON object per reward")
    parser.add_argument(
        "--test-kwargs", metavar="NAME", help="print the keywords of NAME's offline test form"
    )
    args = parser.parse_args(list(argv or []))
    if args.test_kwargs:
        try:
            kwargs = test_kwargs(args.test_kwargs)
        except KeyError as err:  # an unknown name: one line with the valid ones, status 2
            parser.exit(2, f"{parser.prog}: error: {err.args[0]}\n")
        print(
            {
                k: v if isinstance(v, (str, int, float, type(None), list)) else repr(v)
                for k, v in kwargs.items()
            }
        )
        return 0
    if args.json:
        for s in specs():
            print(
                json.dumps(
                    {
                        "name": s.name,
                        "differentiable": s.differentiable,
                        "input_size": s.input_size,
                        "needs_prompts": s.needs_prompts,
                        "source": s.source,
                        "summary": s.summary,
                    }
                )
            )
        return 0
    print(table(markdown=not args.plain))
    return 0
