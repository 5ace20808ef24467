"""Shared helpers for benchmark scripts: markdown tables and a section-wise benchmarks/README.md."""

from __future__ import annotations

import platform
import re
from collections.abc import Sequence
from pathlib import Path

import torch

README = Path(__file__).with_name("README.md")


def hardware() -> str:
    """One line naming the machine the numbers were measured on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{device}, torch {torch.__version__}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, readme: Path = README) -> None:
    """Replace (or append) the section ``name`` of benchmarks/README.md, delimited by markers,
    so that each benchmark script owns its own section and re-running one leaves the rest."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = (
        readme.read_text()
        if readme.exists()
        else "# Benchmarks\n\nEach section is written by the script it names.\n"
    )
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    readme.write_text(text)
