"""Build the small CLIP BPE vocabulary shipped in ``ldu_jax/sd/tiny_tokenizer/`` (for ``tiny_sd``).

The base alphabet is CLIP's 256 byte-level characters, each also with the end-of-word suffix
``</w>``, so any text tokenizes. On top, BPE merges are learned greedily (most frequent pair
first, ties broken by the pair's text) on a fixed list of prompt words until each word is a single
token. Deterministic: rerunning writes identical files.

    python -m ldu_jax.sd.make_tiny_tokenizer [out_dir]
"""
from __future__ import annotations

import collections
import json
import os
import sys

from ldu_jax.sd.clip_tokenizer import EOW, bytes_to_unicode

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer")
SPECIAL = ("<|startoftext|>", "<|endoftext|>")

WORDS = """
a an the of in on at with and or by for to from is it this that his her their its
photo photograph picture image portrait painting drawing sketch render illustration art artwork
style styled artist famous painter oil watercolor canvas pencil cartoon anime realistic detailed
high quality resolution sharp focus close up dslr camera lens studio lighting light background
person people man woman men women boy girl child kid baby face faces head eyes nose mouth smile
smiling hair beard glasses sunglasses hat shirt dress jacket wearing young old elderly
dog cat bird horse animal toy teddy bear backpack vase teapot clock candle sneaker boot bowl cup
car house tree flower flowers garden beach sea city street park forest mountain sky sun snow
red blue green yellow black white brown blonde dark bright colorful
sks zwx ohwx rare token
""".split()


def _byte_alphabet() -> list[str]:
    return list(bytes_to_unicode().values())


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on byte-encoded ``words`` (each with '</w>' on its last symbol)."""
    enc = bytes_to_unicode()
    seqs = []
    for w in dict.fromkeys(words):
        chars = [enc[b] for b in w.encode("utf-8")]
        seqs.append(chars[:-1] + [chars[-1] + EOW])
    merges = []
    while True:
        counts = collections.Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        joined = pair[0] + pair[1]
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


def build(out_dir: str = OUT):
    """Write vocab.json and merges.txt (CLIP layout: bytes, bytes+'</w>', merges, specials)."""
    alphabet = _byte_alphabet()
    merges = learn_merges(WORDS)
    tokens = alphabet + [c + EOW for c in alphabet] + [a + b for a, b in merges] + list(SPECIAL)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
        f.write("\n")
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return len(vocab)


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else OUT), "tokens")
