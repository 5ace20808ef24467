"""Training prompts: a single prompt, a text file (one per line) or a built-in list."""

from __future__ import annotations

from pathlib import Path

from steer.train.config import PromptConfig

BUILTIN: dict[str, list[str]] = {
    # the short animal list used by DDPO-style experiments (a few common animals)
    "simple-animals": [
        "cat",
        "dog",
        "horse",
        "monkey",
        "rabbit",
        "zebra",
        "spider",
        "bird",
        "sheep",
        "deer",
        "cow",
        "goat",
        "lion",
        "tiger",
        "bear",
        "raccoon",
        "fox",
        "wolf",
        "lizard",
        "beetle",
        "ant",
        "butterfly",
        "fish",
        "shark",
        "whale",
        "dolphin",
        "squirrel",
        "mouse",
        "rat",
        "snake",
        "turtle",
        "frog",
        "chicken",
        "duck",
        "goose",
        "bee",
        "pig",
        "turkey",
        "fly",
        "llama",
        "camel",
        "bat",
        "gorilla",
        "hedgehog",
        "kangaroo",
    ],  # fmt: skip
    "digits": [f"a handwritten digit {d}" for d in range(10)],
}


def load_prompts(cfg: PromptConfig) -> list[str] | None:
    """The prompt set of a run, or ``None`` for an unconditional model. Raises
    ``FileNotFoundError`` for a missing ``prompts.file``, ``ValueError`` for an empty one and for
    evaluation prompts outside the set (the evaluation reuses the training prompts' embeddings)."""
    prompts = _training_prompts(cfg)
    outside = [p for p in cfg.eval_prompts if prompts is None or p not in prompts]
    if outside:
        fix = (
            "add them to the training prompts or leave prompts.eval_prompts empty"
            if prompts is not None
            else "an unconditional run has no prompts: leave prompts.eval_prompts empty"
        )
        raise ValueError(f"prompts.eval_prompts {outside[:3]} are not training prompts; {fix}")
    return prompts


def _training_prompts(cfg: PromptConfig) -> list[str] | None:
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise ValueError("prompts.prompt is empty; give a prompt or null")
        return [cfg.prompt]
    if cfg.file is not None:
        path = Path(cfg.file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts.file={path} does not exist; give a text file with one prompt per line"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"prompts.file={path} is not UTF-8 text ({err.reason})") from err
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts.file={path} holds no prompt (one per line expected)")
        return prompts
    if cfg.builtin is not None:
        return list(BUILTIN[cfg.builtin])
    return None
