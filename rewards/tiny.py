"""Offline tokenizers for the test forms of the transformers-based rewards.

- :func:`clip_tokenizer`: a transformers ``CLIPTokenizer`` built from the CLIP BPE merges that
  open_clip ships (``bpe_simple_vocab_16e6.txt.gz``), truncated to ``n_merges`` merges; with all
  48,894 merges it is the real CLIP vocabulary (49,408 tokens).
- :func:`bert_tokenizer`: a small WordPiece ``BertTokenizer`` (lower-case letters, digits,
  punctuation, a few words) with BLIP's extra ``[DEC]`` / ``[ENC]`` tokens.

Both pass ``vocab=`` / ``merges=`` directly: with transformers 5,
``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds an empty vocabulary.
"""

from __future__ import annotations

import gzip
import string
from typing import Any

__all__ = ["clip_tokenizer", "bert_tokenizer"]

_CLIP_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from the 256 bytes to printable unicode characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    # printable bytes map to themselves and come first; the others follow, shifted past 255
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clip_tokenizer(n_merges: int = 1000) -> Any:
    """A transformers CLIPTokenizer with the first ``n_merges`` CLIP merges (vocabulary
    ``512 + n_merges + 2``); ids of ``<|startoftext|>`` / ``<|endoftext|>`` are the last two."""
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    if not 0 <= n_merges <= _CLIP_N_MERGES:
        raise ValueError(f"n_merges must be in [0, {_CLIP_N_MERGES}], got {n_merges}")
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 1 + n_merges]
    merges = [tuple(line.split()) for line in lines]
    # 1. vocabulary in CLIP's order: bytes, bytes + "</w>", merged pairs, then the two specials
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    if len(tok) != len(vocab):
        raise RuntimeError(f"CLIPTokenizer vocabulary has {len(tok)} tokens, built {len(vocab)}")
    return tok


def bert_tokenizer() -> Any:
    """A small uncased WordPiece BertTokenizer plus BLIP's ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer

    words = ["a", "an", "the", "of", "photo", "cat", "dog", "painting", "with", "and", "on"]
    pieces = list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + ["##" + p for p in pieces]
    tokens += [w for w in words if w not in tokens]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok
