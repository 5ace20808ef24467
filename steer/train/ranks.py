"""What the processes of a run agree on before each collective call, so that none waits forever.

Every rank runs the same sequence of collective calls (gathers, the gradient all-reduce, the
barriers of a save). A rank that stops early, on a non-finite value or a signal, would leave the
others blocked in the next one; instead each such decision is taken together: every rank
reports its own flag in one small gather and all act on the same answer (skip together, save
and raise together, stop after the same step).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from steer.train.sampling import NonFiniteError


class OtherRankFailed(NonFiniteError):
    """Raised on a healthy rank when another one reported a non-finite value."""

    def __init__(self) -> None:
        super().__init__("value on another process", [], None)


def flagged_ranks(acc: Accelerator, flag: bool) -> list[int]:
    """The ranks whose ``flag`` is set; every rank must call it at the same point."""
    if acc.num_processes == 1:
        return [0] if flag else []
    flags = acc.gather(torch.tensor([int(flag)], device=acc.device)).tolist()  # [world]
    return [rank for rank, f in enumerate(flags) if f]


def describe_failure(
    acc: Accelerator, err: NonFiniteError | None, failed: list[int]
) -> tuple[str, str]:
    """``(what went wrong, the failing term)``, told the same on every rank: ``str(err)`` and
    ``err.term`` on one process, else ``rank r: ...`` for each failed rank and the first failed
    rank's term (one gather of the messages, on the path every rank agreed to take)."""
    if acc.num_processes == 1:
        return str(err), "" if err is None else err.term
    own = err is not None and not isinstance(err, OtherRankFailed)
    reports = gather_object([(str(err), err.term) if own else ("", "")])  # [world]
    return "; ".join(f"rank {r}: {reports[r][0]}" for r in failed), reports[failed[0]][1]
