"""ArkAsrProcessor: the one processor training, batch and serving share.

It owns every convention between audio and tokens: log-mel features (ark_ray.audio), the number
of `<|audio|>` placeholders per clip, the exact prompt, training labels, the allowed-token mask
for generation and the cleanup of generated ids into `pred_text` / `pred_text_raw`.

Prompt (no newlines, no system turn, no BOS, add_special_tokens=False):
    <|user|><|begin_of_audio|> <|audio|> x N <|end_of_audio|>Please transcribe this audio.<|assistant|>
Training target: transcript + <|im_end|>.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature

from ark_ray.audio import SAMPLE_RATE, log_mel, mel_frames
from ark_ray.model.config import audio_token_count

INSTRUCTION = "Please transcribe this audio."
_SPECIAL_PATTERN = re.compile(r"<\|[^|<>]*\|>")
_TURN_MARKERS = ("<|user|>", "<|assistant|>", "<|im_end|>", "<|im_start|>", "<|system|>")
_LEADING_NOISE = re.compile(r"^[\s,.;:!?-]+")


def clean_text(raw: str, specials: Sequence[str] = ()) -> str:
    """open-audio-opd's `normalize_prediction_text` (its inference script's cleanup): raw decoded text -> transcript.

    Cut at the first turn/stop marker, keep only what follows a `<|text|>` tag, drop every other
    `<|...|>` token (and any of `specials`, e.g. `<tool_call>`), collapse whitespace, strip
    leading punctuation noise.
    """
    text = raw
    for marker in _TURN_MARKERS:
        if marker in text:
            text = text[: text.index(marker)]
    if "<|text|>" in text:
        text = text.split("<|text|>", 1)[1]
    text = _SPECIAL_PATTERN.sub(" ", text)
    for tok in specials:
        text = text.replace(tok, " ")
    return _LEADING_NOISE.sub("", " ".join(text.split()))


@dataclass(frozen=True)
class TokenIds:
    audio: int
    user: int
    assistant: int
    begin_audio: int
    end_audio: int
    eos: int
    pad: int


class ArkAsrProcessor:
    def __init__(self, tokenizer, merge_factor: int = 4, instruction: str = INSTRUCTION,
                 audio_token: str = "<|audio|>"):
        self.tokenizer = tokenizer
        self.merge_factor = merge_factor
        self.instruction = instruction
        self.audio_token = audio_token

        def tid(tok: str) -> int:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {tok} token; it is not an ARK-ASR tokenizer")
            return int(i)

        self.token_ids = TokenIds(
            audio=tid(audio_token), user=tid("<|user|>"), assistant=tid("<|assistant|>"),
            begin_audio=tid("<|begin_of_audio|>"), end_audio=tid("<|end_of_audio|>"),
            eos=tid("<|im_end|>"),
            pad=int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else tid("<|endoftext|>"))
        self._instruction_ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ prompt and features
    def audio_token_count(self, n_samples: int) -> int:
        """Placeholders for a clip of `n_samples` at 16 kHz (12.5 per second)."""
        return audio_token_count(mel_frames(n_samples), self.merge_factor)

    def prompt_ids(self, n_audio_tokens: int) -> list[int]:
        t = self.token_ids
        return ([t.user, t.begin_audio] + [t.audio] * int(n_audio_tokens) + [t.end_audio]
                + list(self._instruction_ids) + [t.assistant])

    def featurize(self, waves: Sequence[np.ndarray], device=None) -> dict[str, torch.Tensor]:
        feats, frames = log_mel(waves, device=device)
        return {"input_features": feats, "feature_lengths": frames}

    def target_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.token_ids.eos]

    def __call__(self, audios: Sequence[np.ndarray], texts: Optional[Sequence[str]] = None,
                 padding_side: str = "left", device=None) -> BatchFeature:
        """Model inputs for a batch of 16 kHz clips.

        Without `texts`: generation prompts, left-padded. With `texts`: prompt + target + EOS,
        `labels` = -100 on prompt and padding; right padding is the usual choice for training.
        """
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        if texts is not None and len(texts) != len(audios):
            raise ValueError(f"{len(audios)} clips but {len(texts)} texts")
        feats = self.featurize(audios, device=device)
        return self.collate(feats["input_features"], feats["feature_lengths"], texts, padding_side)

    def collate(self, input_features: torch.Tensor, feature_lengths: torch.Tensor,
                texts: Optional[Sequence[str]] = None, padding_side: str = "left") -> BatchFeature:
        """Token ids (+ labels) for already-computed features (e.g. from a Ray Data stage)."""
        feats = {"input_features": input_features, "feature_lengths": feature_lengths}
        rows, label_rows = [], []
        for i, frames in enumerate(feats["feature_lengths"].tolist()):
            prompt = self.prompt_ids(audio_token_count(frames, self.merge_factor))
            if texts is None:
                rows.append(prompt)
            else:
                target = self.target_ids(texts[i])
                rows.append(prompt + target)
                label_rows.append([-100] * len(prompt) + target)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.token_ids.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long) if texts is not None else None
        for i, row in enumerate(rows):
            sl = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[i, sl] = torch.tensor(row)
            mask[i, sl] = 1
            if labels is not None:
                labels[i, sl] = torch.tensor(label_rows[i])
        data = {"input_ids": ids, "attention_mask": mask, **feats}
        if labels is not None:
            data["labels"] = labels
        return BatchFeature(data)

    # ------------------------------------------------------------------ generation mask
    @cached_property
    def _special_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        ids = set(tok.all_special_ids)
        for tid, added in tok.added_tokens_decoder.items():
            ids.add(int(tid))
        for piece, tid in tok.get_vocab().items():  # <|...|> pieces in the base vocab (fillers)
            if _SPECIAL_PATTERN.fullmatch(piece):
                ids.add(int(tid))
        return frozenset(ids)

    @cached_property
    def _special_strings(self) -> tuple[str, ...]:
        return tuple(sorted({t.content for t in self.tokenizer.added_tokens_decoder.values()}
                            | set(self.tokenizer.all_special_tokens), key=len, reverse=True))

    def blocked_token_ids(self, vocab_size: int) -> list[int]:
        """Every special / added / control id, and every id past the tokenizer, except EOS."""
        blocked = {i for i in self._special_ids if i < vocab_size}
        blocked.update(range(len(self.tokenizer), vocab_size))
        blocked.discard(self.token_ids.eos)
        return sorted(blocked)

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor:
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[self.blocked_token_ids(vocab_size)] = False
        return mask

    def allowed_token_ids(self, vocab_size: int) -> list[int]:
        return torch.nonzero(self.allowed_token_mask(vocab_size)).flatten().tolist()

    # ------------------------------------------------------------------ output cleanup
    def decode(self, ids: Sequence[int]) -> tuple[str, str]:
        """Generated ids -> (pred_text, pred_text_raw).

        raw: everything before the first EOS, special tokens kept; clean: `clean_text(raw)`.
        """
        ids = [int(i) for i in ids]
        if self.token_ids.eos in ids:
            ids = ids[: ids.index(self.token_ids.eos)]
        raw = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return clean_text(raw, self._special_strings), raw

    def batch_decode(self, sequences: Sequence[Sequence[int]]) -> list[tuple[str, str]]:
        return [self.decode(s) for s in sequences]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump({
                "processor_class": "ArkasrProcessor", "merge_factor": self.merge_factor,
                "audio_token": self.audio_token, "audio_dtype": "float32", "instruction": self.instruction,
                "tokenizer_config": {"padding_side": "left", "model_max_length": 8192},
            }, f, indent=2)
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({
                "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
                "sampling_rate": SAMPLE_RATE, "hop_length": 160, "n_fft": 400, "chunk_length": 30,
                "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
                "padding_value": 0.0, "return_attention_mask": False,
            }, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "ArkAsrProcessor":
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        cfg_path = os.path.join(path, "processor_config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        return cls(tokenizer, merge_factor=int(cfg.get("merge_factor", 4)),
                   instruction=cfg.get("instruction", INSTRUCTION),
                   audio_token=cfg.get("audio_token", "<|audio|>"))

    def config_dict(self) -> dict:
        return {"merge_factor": self.merge_factor, "instruction": self.instruction,
                "token_ids": asdict(self.token_ids)}
