"""The prepared GPU check: bf16 LoRA training steps of SD 1.5, SDXL and SD3-medium at their real
architectures (random weights, offline) and real latent sizes.

Run on a CUDA machine (no internet needed): ``python -m benchmarks.gpu``. ``--budget-s`` (default
420) stops starting new cases after that many seconds, so that the whole check stays under 8
minutes; cases left out are named in the table. Not yet run on a GPU.
It writes the "gpu" section of benchmarks/README.md (and ``--table FILE``). Each case is its own
process (``benchmarks.real_size.measure``): rtb first for every family, with and without gradient
checkpointing, then db; peak memory is ``torch.cuda.max_memory_allocated`` over the step.

``--reduced`` runs the same cases on the tiny stand-ins of each family (``tiny``, ``tiny-sdxl``,
``tiny-sd3``, 8×8 latents): the script's own test, on CPU (``--device cpu``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.real_size import FAMILIES, Case, run_case, table


def main(argv: list[str] | None = None) -> list[list]:
    import torch

    from benchmarks._report import hardware, write_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--reduced", action="store_true", help="tiny stand-ins (the script's test)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--objectives", nargs="+", default=["rtb", "db"])
    ap.add_argument("--steps", type=int, default=4, help="K sampling steps (default 4)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--table", type=Path, help="also write the section to this file")
    ap.add_argument("--no-write", action="store_true", help="leave benchmarks/README.md alone")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device; run with --device cpu --reduced")
    precision = "bf16" if args.device == "cuda" else "no"
    cases = [
        Case(f, o, ckpt, 8 if args.reduced else FAMILIES[f][1], steps=args.steps,
             batch=args.batch, device=args.device, precision=precision, reduced=args.reduced)
        for o in args.objectives for f in args.families for ckpt in (False, True)
    ]  # fmt: skip
    start, results = time.perf_counter(), []
    for case in cases:
        if time.perf_counter() - start > args.budget_s:
            results.append({"error": f"not run (over the {args.budget_s:.0f} s budget)"})
        else:
            left = args.budget_s - (time.perf_counter() - start)
            results.append(run_case(case, timeout=max(60.0, left + 120.0)))
        print(
            f"{case.family} {case.objective} ckpt={case.checkpointing}: {results[-1]}", flush=True
        )
    text, rows = table(cases, results)
    size = (
        "8×8 (reduced: tiny stand-ins)" if args.reduced else "64×64 (SD 1.5), 128×128 (SDXL, SD3)"
    )
    body = (
        "## gpu\n\n`python -m benchmarks.gpu`: one LoRA optimiser step (rank 8) per family at its "
        f"published architecture with random weights, {precision} autocast, batch {args.batch}, "
        f"no guidance, K = {args.steps} with half re-scored, latents {size}, the aesthetic "
        "reward (random CLIP ViT-L/14); SD3 without T5. Peak memory: "
        + ("`torch.cuda.max_memory_allocated` over the step" if args.device == "cuda"
           else "the process's peak RSS")
        + f"; wall time {time.perf_counter() - start:.0f} s.\n\nHardware: {hardware()}\n\n"
        f"{text}\n"
    )  # fmt: skip
    print(body)
    if args.table is not None:
        args.table.write_text(body)
    if not args.no_write:
        write_section("gpu", body)
    return rows


if __name__ == "__main__":
    main()
