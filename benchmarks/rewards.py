"""Reward throughput (images/s).

1. Every built-in reward in its offline test form on CPU at batch 1, 8 and 32 (64x64 images).
2. The JPEG rewards on 512x512 images: a plain loop against a thread pool.
3. On a GPU only: the real-size architectures with random weights at batch 32 in bf16.

Run from the repository root: ``python -m benchmarks.rewards [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

import steer.rewards as R
from benchmarks._report import hardware, markdown_table, write_section

PROMPT = "a photo of a cat sitting on a red chair"


def throughput(fn: Callable[[], object], n_images: int, min_time: float = 0.5) -> float:
    """Images per second of ``fn`` after one warm-up call."""
    fn()
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or reps >= 20:
            return reps * n_images / elapsed


def cpu_rows(batches: list[int], min_time: float) -> list[list[object]]:
    rows = []
    names = [n for n in R.names() if n != "digits-classifier"]
    for name in tqdm(names, desc="test forms"):
        r = R.get(name, **R.test_kwargs(name))
        r.batch_size = max(batches)
        row: list[object] = [name, "yes" if r.differentiable else "no"]
        for b in batches:
            x = torch.rand(b, 3, 64, 64)
            prompts = [PROMPT] * b
            with torch.no_grad():
                row.append(throughput(lambda r=r, x=x, p=prompts: r(x, p), b, min_time))
        rows.append(row)
    return rows


def jpeg_rows(min_time: float) -> list[list[object]]:
    x = torch.rand(32, 3, 512, 512)
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)  # smoother than white noise
    rows = []
    for workers in (0, 2, 4):
        r = R.get("jpeg-compressibility", num_workers=workers)
        rows.append(["loop" if workers == 0 else f"{workers} threads",
                     throughput(lambda r=r: r(x), len(x), min_time)])  # fmt: skip
    return rows


def real_size_builders() -> dict[str, Callable[[], R.Reward]]:
    """The published architectures with random weights (nothing is downloaded)."""
    from transformers import CLIPConfig, CLIPModel

    from steer.rewards.aesthetic import aesthetic
    from steer.rewards.clip_score import clip_score, hpsv2
    from steer.rewards.imagereward import ImageReward, ImageRewardModel, blip_configs
    from steer.rewards.pickscore import PickScoreReward
    from steer.rewards.tiny import bert_tokenizer, clip_tokenizer

    def pick() -> R.Reward:
        tok = clip_tokenizer(48_894)
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, hidden_act="gelu")  # fmt: skip
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=16, patch_size=14, hidden_act="gelu")  # fmt: skip
        net = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024))
        mean, std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
        return PickScoreReward(net, tok, (224, 224), mean, std, "random CLIP-H", 32).freeze()

    def imr() -> R.Reward:
        model = ImageRewardModel(*blip_configs("large"))
        return ImageReward(model, bert_tokenizer(), "random ImageReward", 32).freeze()

    return {
        "aesthetic (ViT-L-14)": lambda: aesthetic("ViT-L-14", None, None),
        "clip-score (ViT-L-14)": lambda: clip_score("ViT-L-14", None),
        "hpsv2 (ViT-H-14)": lambda: hpsv2(weights=None),
        "pickscore (CLIP-H)": pick,
        "imagereward (BLIP-L)": imr,
    }


def real_size_rows(
    device: str, dtype: torch.dtype, batch: int, min_time: float, only: list[str] | None = None
) -> list[list[object]]:
    """Images/s of the real-size architectures at ``batch`` on 512x512 inputs."""
    rows = []
    x = torch.rand(batch, 3, 512, 512, device=device).to(dtype)
    builders = {k: v for k, v in real_size_builders().items() if not only or k in only}
    for name, build in tqdm(builders.items(), desc=f"real-size on {device}"):
        r = build().to(device, dtype)
        r.batch_size = batch

        def call(r: R.Reward = r) -> None:
            with torch.no_grad():
                s = r(x, [PROMPT] * batch)
            assert s.shape == (batch,)
            if device == "cuda":
                torch.cuda.synchronize()

        rows.append([name, throughput(call, batch, min_time)])
        del r
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    args = parser.parse_args(argv)
    min_time = 0.2 if args.quick else 0.5
    batches = [1, 8, 32]
    text = [f"Measured on {hardware()}. CPU timings are noisy while others share the cores.", ""]
    text.append("Test forms (tiny random models, 64x64 inputs), images/s on CPU:\n")
    header = ["reward", "differentiable"] + [f"batch {b}" for b in batches]
    text.append(markdown_table(header, cpu_rows(batches, min_time)))
    text.append("\nJPEG compressibility on 32 images of 512x512, images/s:\n")
    text.append(markdown_table(["encoder", "images/s"], jpeg_rows(min_time)))
    if torch.cuda.is_available():
        text.append("\nReal-size architectures (random weights), batch 32, bf16, 512x512:\n")
        rows = real_size_rows("cuda", torch.bfloat16, 32, min_time)
        text.append(markdown_table(["reward", "images/s"], rows))
    else:
        text.append("\nReal-size architectures in bf16 on a GPU: not measured (no GPU here).")
    body = "## Rewards (`python -m benchmarks.rewards`)\n\n" + "\n".join(text)
    print(body)
    write_section("rewards", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
