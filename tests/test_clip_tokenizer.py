"""The CLIP tokenizer (ldu_jax/sd/clip_tokenizer.py) gives the ids transformers 4.57's slow
CLIPTokenizer gave, with transformers 4 and 5: the tiny and the shipped mini-world tokenizers, with
two Textual Inversion placeholder tokens; every folder form (vocab.json + merges.txt, tokenizer.json,
what we save) loads to the same tokenizer."""
import copy
import os
import shutil
import types

import numpy as np
import pytest

from ldu_jax.sd import clip_tokenizer as ct
from ldu_jax.sd import models as M

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ldu_jax", "miniworld", "models",
                       "sd", "tokenizer")
PLACEHOLDERS = ("<person>", "<sks-concept>")

PROMPTS = ["a photo of sks dog", "A Photo of SKS Dog!", "a dslr portrait of <person> person",
           "a photo of<person>person", "  many   spaces\tand\nnewlines  ", "it's the dog's toy, isn't it?",
           "Zebra-Ünïcode 42!", "café naïve résumé", "ＦＵＬＬ width ﬁ ligature", "e\u0301 vs é",
           "x" * 30, "cat " * 100, "", "<|endoftext|> hi", "an oil painting in the style of monet, highly detailed",
           "<PERSON> <person>s sks* <sks-concept>dog", "3.14 1,000 $5 #tag @user", "emoji 😀 ok"]
if __name__ == "__main__":
  pass

# Produced with transformers 4.57.6 (its slow, pure-Python CLIPTokenizer, no ftfy installed), before
# the move to transformers 5: for each tokenizer ('tiny': M.tiny_tokenizer(); 'shipped':
# CLIPTokenizer.from_pretrained(SHIPPED)), a deep copy with tok.add_tokens(t) for t in PLACEHOLDERS,
# then tok(PROMPTS, truncation=True, max_length=tok.model_max_length).input_ids.
IDS = {'shipped': [[933, 320, 877, 850, 899, 738, 934], [933, 320, 877, 850, 899, 738, 256, 934],
             [933, 320, 743, 870, 850, 935, 866, 934], [933, 320, 877, 850, 935, 866, 934],
             [933, 76, 519, 344, 82, 79, 516, 527, 631, 77, 68, 86, 75, 515, 527, 934],
             [933, 816, 6, 338, 918, 738, 6, 338, 921, 267, 72, 82, 333, 6, 339, 816, 286, 934],
             [933, 89, 68, 568, 320, 268, 127, 120, 77, 127, 107, 572, 67, 324, 275, 273, 256, 934],
             [933, 540, 69, 127, 358, 77, 64, 127, 107, 85, 324, 81, 127, 102, 607, 76, 127, 358, 934],
             [933, 171, 121, 228, 171, 121, 243, 171, 121, 234, 171, 121, 490, 86, 72, 67, 83, 327, 171, 105,
              479, 529, 70, 619, 612, 324, 934],
             [933, 127, 358, 85, 338, 127, 358, 934],
             [933, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87,
              87, 87, 87, 87, 87, 87, 343, 934],
             [933, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691,
              691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691, 691,
              691, 691, 691, 691, 691, 691, 691, 691, 691, 934],
             [933, 934], [933, 934, 71, 328, 934],
             [933, 533, 852, 875, 592, 918, 907, 850, 838, 77, 577, 267, 521, 547, 596, 732, 934],
             [933, 283, 866, 285, 935, 338, 899, 265, 936, 738, 934],
             [933, 274, 269, 272, 275, 272, 267, 271, 271, 271, 259, 276, 258, 83, 64, 326, 287, 84, 82, 526,
              934],
             [933, 68, 838, 73, 328, 172, 253, 246, 478, 78, 330, 934]],
 'tiny': [[879, 320, 831, 809, 848, 711, 880], [879, 320, 831, 809, 848, 711, 256, 880],
          [879, 320, 716, 825, 809, 881, 823, 880], [879, 320, 831, 809, 881, 823, 880],
          [879, 76, 520, 344, 82, 79, 514, 530, 617, 77, 68, 86, 75, 516, 530, 880],
          [879, 779, 6, 338, 864, 711, 6, 338, 867, 267, 72, 82, 333, 6, 339, 779, 286, 880],
          [879, 89, 68, 561, 320, 268, 127, 120, 77, 127, 107, 566, 67, 324, 275, 273, 256, 880],
          [879, 563, 69, 127, 358, 77, 64, 127, 107, 85, 324, 81, 127, 102, 595, 76, 127, 358, 880],
          [879, 171, 121, 228, 171, 121, 243, 171, 121, 234, 171, 121, 490, 86, 72, 67, 83, 327, 171, 105,
           479, 75, 72, 70, 604, 84, 81, 324, 880],
          [879, 127, 358, 85, 338, 127, 358, 880],
          [879, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87, 87,
           87, 87, 87, 87, 87, 87, 343, 880],
          [879, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670,
           670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670,
           670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670,
           670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 670, 880],
          [879, 880], [879, 880, 71, 328, 880],
          [879, 603, 811, 827, 777, 864, 855, 809, 76, 78, 77, 571, 267, 517, 538, 75, 344, 709, 880],
          [879, 283, 823, 285, 881, 338, 848, 265, 882, 711, 880],
          [879, 274, 269, 272, 275, 272, 267, 271, 271, 271, 259, 276, 258, 83, 64, 326, 287, 84, 82, 523,
           880],
          [879, 68, 76, 78, 73, 328, 172, 253, 246, 478, 78, 330, 880]]}


def _tokenizers():
    return {"tiny": M.tiny_tokenizer(), "shipped": ct.load(SHIPPED)}


def _with_placeholders(tok):
    tok = copy.deepcopy(tok)
    assert all(ct.add_token(tok, t) == 1 for t in PLACEHOLDERS)
    return tok


def _padded(tok, ids):
    return [x + [tok.pad_token_id] * (tok.model_max_length - len(x)) for x in ids]


@pytest.mark.parametrize("name", ["tiny", "shipped"])
def test_ids_are_the_ones_transformers_4_gave(name):
    tok = _with_placeholders(_tokenizers()[name])
    assert tok.model_max_length == {"tiny": 77, "shipped": 48}[name]
    got = M.tokenize(types.SimpleNamespace(tokenizer=tok), PROMPTS)
    assert got.dtype == np.int32
    for prompt, want, row in zip(PROMPTS, _padded(tok, IDS[name]), got.tolist()):
        assert row == want, prompt


def test_every_folder_form_loads_to_the_same_tokenizer(tmp_path):
    """vocab.json + merges.txt (as SD repositories ship them), what ct.save writes (both forms),
    tokenizer.json alone (what transformers 5 writes), and a saved placeholder token."""
    base = _with_placeholders(M.tiny_tokenizer())
    ct.save(base, str(tmp_path / "saved"))
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "saved"))
    shutil.copytree(tmp_path / "saved", tmp_path / "json_only")
    if os.path.isfile(tmp_path / "json_only" / "tokenizer.json"):
        for n in ct.VOCAB_FILES:
            os.remove(tmp_path / "json_only" / n)
    os.makedirs(tmp_path / "plain")
    for n in ct.VOCAB_FILES:
        shutil.copy(os.path.join(M.TOKENIZER_DIR, n), tmp_path / "plain" / n)
    want = M.tokenize(types.SimpleNamespace(tokenizer=base), PROMPTS).tolist()
    assert want == _padded(base, IDS["tiny"])
    for form in ("saved", "json_only"):
        tok = ct.load(str(tmp_path / form))
        assert tok.model_max_length == 77 and len(tok) == len(base), form
        assert M.tokenize(types.SimpleNamespace(tokenizer=tok), PROMPTS).tolist() == want, form
    plain = ct.load(str(tmp_path / "plain"))
    plain.model_max_length = 77
    assert len(plain) == len(M.tiny_tokenizer())
    assert M.tokenize(types.SimpleNamespace(tokenizer=_with_placeholders(plain)), PROMPTS).tolist() == want
    # the vocab.json + merges.txt we write are the shipped files' vocabulary and merges
    with open(tmp_path / "saved" / "merges.txt") as f, open(os.path.join(M.TOKENIZER_DIR, "merges.txt")) as g:
        assert f.read() == g.read()


def test_a_folder_without_a_vocabulary_is_named(tmp_path):
    os.makedirs(tmp_path / "tok")
    shutil.copy(os.path.join(M.TOKENIZER_DIR, "vocab.json"), tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match=r"my tokenizer lacks merges.txt \(or a tokenizer.json\)"):
        ct.load(str(tmp_path / "tok"), "my tokenizer")


def test_placeholder_matches_the_raw_text_only():
    """As transformers 4's slow tokenizer: '<person>' is one token where written so, and not in
    '<PERSON>' (no lower-casing before matching); its neighbours tokenize as without it."""
    tok = M.tiny_tokenizer()
    ph = _with_placeholders(tok)
    pid = ph.convert_tokens_to_ids("<person>")
    assert pid == len(tok) and ph.encode("<person>", add_special_tokens=False) == [pid]
    assert pid not in ph.encode("<PERSON>", add_special_tokens=False)
    assert ph.encode("<PERSON>", add_special_tokens=False) == tok.encode("<PERSON>", add_special_tokens=False)


def test_byte_alphabet_is_clips():
    from tokenizers.pre_tokenizers import ByteLevel
    enc = ct.bytes_to_unicode()
    assert sorted(enc) == list(range(256)) and set(enc.values()) == set(ByteLevel.alphabet())
    assert enc[ord("a")] == "a" and enc[ord(" ")] == "Ġ" and enc[0] == "Ā"
