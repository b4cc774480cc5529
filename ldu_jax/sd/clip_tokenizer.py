"""The CLIP tokenizer (transformers' ``CLIPTokenizer``, backed by the tokenizers library):
loading, saving and building tokenizer folders, and placeholder tokens.

A tokenizer folder holds ``vocab.json`` + ``merges.txt`` (as Stable Diffusion repositories ship
them) or ``tokenizer.json`` (what transformers 5 writes); ``save`` writes both forms, so the folders
this project writes also load with older transformers (4.x: vocab.json + merges.txt only). The ids
are those transformers 4.57's slow tokenizer gave (tested against ids stored from it), with one
known difference: without ``ftfy`` installed it split CJK characters into separate words, which
transformers 5 (like OpenAI's CLIP) does not.
"""
from __future__ import annotations

import contextlib
import json
import os

from ldu_jax.errors import MissingError

VOCAB_FILES = ("vocab.json", "merges.txt")
EOW = "</w>"


@contextlib.contextmanager
def _no_advisory_warnings():
    """transformers 5 advises on import that PyTorch was not found (which is how we run)."""
    old = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = old


def tokenizer_class():
    """transformers' CLIPTokenizer (imported quietly)."""
    with _no_advisory_warnings():
        from transformers import CLIPTokenizer
    return CLIPTokenizer


def from_files(vocab_file: str, merges_file: str, model_max_length: int):
    """A CLIPTokenizer from a CLIP-layout ``vocab.json`` and ``merges.txt``."""
    return tokenizer_class()(vocab_file, merges_file, model_max_length=int(model_max_length))


def missing_files(folder: str) -> list[str]:
    """What a tokenizer folder lacks: [] when it has ``tokenizer.json`` or both ``vocab.json`` and
    ``merges.txt``, else the missing ones of the latter."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return []
    return [n for n in VOCAB_FILES if not os.path.isfile(os.path.join(folder, n))]


def load(folder: str, what: str = "tokenizer"):
    """The CLIPTokenizer of ``folder`` (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``);
    a ``MissingError`` (a FileNotFoundError) naming ``what`` and the missing files otherwise."""
    missing = missing_files(folder)
    if missing:
        raise MissingError(f"{what} lacks {' and '.join(missing)} (or a tokenizer.json): {folder}")
    return tokenizer_class().from_pretrained(folder)


def save(tok, folder: str):
    """``tok.save_pretrained(folder)`` (``tokenizer.json``, ``tokenizer_config.json``), plus
    ``vocab.json`` and ``merges.txt`` in CLIP's layout."""
    tok.save_pretrained(folder)
    vocab, merges = bpe_model(tok)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def bpe_model(tok) -> tuple[dict, list[tuple[str, str]]]:
    """(vocab, merges) of the tokenizer's BPE model (added tokens apart)."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def add_token(tok, token: str) -> int:
    """Add ``token`` to ``tok`` (in place), matched in the raw text, case and all, as transformers
    4's slow tokenizer matched it (transformers 5 matches a plain ``add_tokens(str)`` after
    lower-casing). Returns how many were added (0 or 1)."""
    from tokenizers import AddedToken
    return tok.add_tokens(AddedToken(token, normalized=False))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's reversible map of the 256 bytes to printable characters (in CLIP's order:
    the printable bytes map to themselves, the rest to 256, 257, ... in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    bs, cs, n = keep[:], keep[:], 0
    for b in range(256):
        if b not in keep:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


__all__ = ["EOW", "VOCAB_FILES", "add_token", "bpe_model", "bytes_to_unicode", "from_files", "load",
           "missing_files", "save", "tokenizer_class"]
