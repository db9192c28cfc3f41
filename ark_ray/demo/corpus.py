"""The bundled demo speech corpus: deterministic synthetic English (+ a small multilingual slice).

Texts come from templates over a small closed vocabulary (digits, names, home/robot commands,
short sentences) so a few-million-parameter model can learn them on a CPU in minutes. Audio
comes from espeak-ng and flite (Debian packages), several voices, speeds and pitches, chosen per
utterance by a hash of its id (no global random state), resampled to 16 kHz mono 16-bit FLAC.

    python -m ark_ray.demo.corpus --out runs/demo_corpus_full --splits train --n-train 3000
    python -m ark_ray.demo.corpus --out assets/demo_corpus            # the committed splits
    python -m ark_ray.demo.corpus --out runs/demo_corpus_opus --splits train --format opus  # 5x smaller

`--format opus` (Ogg Opus, ~7 KB per utterance instead of ~32 KB) is for shipping the train set
to another machine, e.g. the GPU box, whose whole upload is capped at 64 MiB.

Manifests are JSONL in open-audio-opd's manifest format: id, audio (relative to the manifest's folder), text,
language, duration, begin_time, end_time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import subprocess
import tempfile
from typing import Iterator

import numpy as np
import soundfile as sf

REPO = pathlib.Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "demo_corpus"

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMBERS = DIGITS[1:] + ["ten", "twenty", "thirty", "fifteen", "forty", "fifty", "hundred"]
FIRST = ["alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "irene", "jack",
         "karen", "leo", "maria", "nathan", "olivia", "peter", "rachel", "sam", "tina", "victor"]
LAST = ["smith", "jones", "brown", "miller", "davis", "wilson", "taylor", "clark", "lewis", "walker",
        "young", "king", "wright", "green", "baker", "adams", "nelson", "hill", "moore", "hall"]
ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway", "garden"]
DEVICES = ["lights", "fan", "heater", "radio", "television", "oven", "alarm", "music"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
OBJECTS = ["box", "cup", "ball", "book", "chair", "bottle", "key", "phone"]
UNITS = ["meters", "steps", "seconds", "minutes", "degrees"]
DIRECTIONS = ["forward", "backward", "left", "right", "up", "down"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
SENTENCES = [
    "the weather is nice today", "please close the window", "i would like a cup of tea",
    "where is the nearest station", "the meeting starts at noon", "my battery is almost empty",
    "the train is late again", "can you help me with this", "we need more milk and bread",
    "the dog is sleeping on the sofa", "it is going to rain tomorrow", "thank you very much",
    "see you next week", "the door is locked", "how far is the airport", "the soup is too hot",
]

TEMPLATES = [
    lambda r: " ".join(r.choice(DIGITS) for _ in range(r.randint(3, 6))),
    lambda r: f"call {r.choice(FIRST)} {r.choice(LAST)}",
    lambda r: f"send a message to {r.choice(FIRST)}",
    lambda r: f"turn {r.choice(['on', 'off'])} the {r.choice(ROOMS)} {r.choice(DEVICES)}",
    lambda r: f"move {r.choice(DIRECTIONS)} {r.choice(NUMBERS)} {r.choice(UNITS)}",
    lambda r: f"pick up the {r.choice(COLORS)} {r.choice(OBJECTS)}",
    lambda r: f"set a timer for {r.choice(NUMBERS)} minutes",
    lambda r: f"set the temperature to {r.choice(NUMBERS)} degrees",
    lambda r: f"meet {r.choice(FIRST)} on {r.choice(DAYS)}",
    lambda r: r.choice(SENTENCES),
]

# (engine, voice, speed words/min or None, pitch or None)
VOICES = [
    ("espeak", "en-us", 165, 50), ("espeak", "en-us", 185, 40), ("espeak", "en-gb", 170, 55),
    ("espeak", "en-us+f2", 160, 60), ("espeak", "en-gb-x-rp", 175, 45), ("espeak", "en-us+m3", 170, 50),
    ("flite", "slt", None, None), ("flite", "awb", None, None), ("flite", "kal16", None, None),
    ("flite", "rms", None, None),
]

MULTILINGUAL = {
    "de": ["guten morgen", "wie spät ist es", "das wetter ist schön", "ich habe hunger", "vielen dank"],
    "fr": ["bonjour tout le monde", "quelle heure est il", "il fait beau aujourd'hui", "merci beaucoup"],
    "es": ["buenos días", "qué hora es", "hace buen tiempo hoy", "muchas gracias"],
    "cmn": ["今天天气很好", "你叫什么名字", "现在几点了", "谢谢你"],
}
ESPEAK_LANG = {"de": "de", "fr": "fr-fr", "es": "es", "cmn": "cmn"}

SPLIT_SIZES = {"dev": 30, "test": 60, "train_sample": 40}
SPLIT_SEEDS = {"train": 1, "dev": 2, "test": 3, "train_sample": 1}


def _rng(*parts) -> random.Random:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def texts_for(split: str, n: int, seed: int = 0) -> list[str]:
    """Deterministic transcripts; dev/test never share a text with train (or each other)."""
    held = set()
    if split in ("dev", "test"):
        held = set(texts_for("train", 4000, seed)) | (set(texts_for("dev", SPLIT_SIZES["dev"], seed)) if split == "test" else set())
    r = _rng("texts", split if split != "train_sample" else "train", seed)
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < n * 200:
        tries += 1
        t = TEMPLATES[r.randrange(len(TEMPLATES))](r)
        if t in held or (split in ("dev", "test") and t in seen):
            continue
        seen.add(t)
        out.append(t)
    return out


def vocabulary_texts() -> list[str]:
    """Every word the generator can say (for training the tiny tokenizer), as short texts."""
    words = set(DIGITS + NUMBERS + FIRST + LAST + COLORS + OBJECTS + UNITS + DIRECTIONS + DAYS
                + DEVICES + [w for room in ROOMS for w in room.split()])
    texts = list(SENTENCES) + sorted(words)
    texts += texts_for("train", 4000)
    for lines in MULTILINGUAL.values():
        texts += lines
    return texts


def _synth(text: str, voice: tuple, lang: str, out_wav: str) -> None:
    engine, name, speed, pitch = voice
    if engine == "flite":
        cmd = ["flite", "-voice", name, "-t", text, "-o", out_wav]
    else:
        cmd = ["espeak-ng", "-v", name if lang == "en" else ESPEAK_LANG[lang], "-w", out_wav]
        if speed:
            cmd += ["-s", str(speed)]
        if pitch:
            cmd += ["-p", str(pitch)]
        cmd.append(text)
    subprocess.run(cmd, check=True, capture_output=True)


#: --format -> (file suffix, soundfile format, subtype)
AUDIO_FORMATS = {"flac": (".flac", "FLAC", "PCM_16"), "opus": (".opus", "OGG", "OPUS")}


def synthesize(text: str, utt_id: str, out_path: pathlib.Path, lang: str = "en", fmt: str = "flac") -> float:
    """Speak `text` with the voice chosen by `utt_id`; write 16 kHz mono audio; return seconds."""
    from ark_ray.audio import SAMPLE_RATE, resample

    voice = VOICES[_rng("voice", utt_id).randrange(len(VOICES))] if lang == "en" else ("espeak", lang, 160, 50)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "x.wav")
        _synth(text, voice, lang, wav)
        data, sr = sf.read(wav, dtype="float32", always_2d=True)
    wave = resample(data.mean(axis=1), sr, SAMPLE_RATE)
    # trim leading/trailing digital silence beyond 0.1 s (the synthesizers add ~0.3 s)
    idx = np.nonzero(np.abs(wave) > 1e-3)[0]
    if len(idx):
        wave = wave[max(0, idx[0] - 1600): idx[-1] + 1600]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _, container, subtype = AUDIO_FORMATS[fmt]
    sf.write(out_path, np.clip(wave, -1, 1), SAMPLE_RATE, format=container, subtype=subtype)
    return len(wave) / SAMPLE_RATE


def _items(split: str, n: int, seed: int) -> Iterator[tuple[str, str, str]]:
    if split == "multilingual":
        for lang, lines in MULTILINGUAL.items():
            for i, text in enumerate(lines):
                yield f"ml-{lang}-{i:03d}", text, lang
        return
    for i, text in enumerate(texts_for(split, n, seed)):
        yield f"{split}-{i:05d}", text, "en"


def generate_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0,
                   fmt: str = "flac") -> pathlib.Path:
    out_dir = pathlib.Path(out_dir)
    rows = []
    for utt_id, text, lang in _items(split, n, seed):
        rel = f"{split}/{utt_id}{AUDIO_FORMATS[fmt][0]}"
        dur = synthesize(text, f"{seed}:{utt_id}", out_dir / rel, lang, fmt)
        rows.append({"id": utt_id, "audio": rel, "text": text, "language": lang,
                     "duration": round(dur, 4), "begin_time": None, "end_time": None})
    manifest = out_dir / f"{split}.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return manifest


def demo_cache() -> pathlib.Path:
    """Where demo:// material made on first use is kept (ARK_DEMO_CACHE, default runs/demo_cache)."""
    return pathlib.Path(os.environ.get("ARK_DEMO_CACHE", REPO / "runs" / "demo_cache"))


def scheme_count(uri: str, scheme: str, default: int) -> int | None:
    """`scheme` -> default, `scheme-N` -> N, anything else -> None."""
    if not uri.startswith(scheme):
        return None
    rest = uri[len(scheme):]
    return int(rest[1:]) if rest.startswith("-") else default


def speak_manifest(items: list[tuple[str, str]], out: pathlib.Path, name: str, with_text: bool,
                   workers: int = 4, progress=None) -> pathlib.Path:
    """Speak each (utt_id, text) into `out`/audio/ (voice keyed by "0:utt_id", as the bundled splits
    are) and write `out`/`name` listing them, with or without their texts. Clips already on disk are
    kept and the manifest is written last, so an interrupted run resumes and is never half-used."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = out / name
    if manifest.exists():
        return manifest
    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing (the demo speaks its audio with it): "
                               "run `bash scripts/setup.sh` or `apt-get install -y espeak-ng flite`")
    done = [0]

    def one(item):
        utt_id, text = item
        rel = f"audio/{utt_id}.flac"
        path = out / rel
        if path.exists():
            dur = sf.info(str(path)).duration
        else:
            tmp = path.with_suffix(".part.flac")
            dur = synthesize(text, f"0:{utt_id}", tmp)
            tmp.rename(path)
        done[0] += 1
        if progress:
            progress(done[0], len(items))
        row = {"id": utt_id, "audio": rel, "duration": round(dur, 4), "language": "en"}
        return {**row, "text": text} if with_text else row

    with ThreadPoolExecutor(max(1, workers)) as pool:   # the synthesizers are subprocesses
        rows = list(pool.map(one, items))
    tmp = manifest.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(manifest)
    return manifest


def corpus_dir() -> pathlib.Path:
    return ASSETS


def manifest_path(split: str) -> pathlib.Path:
    """The bundled manifest of `split` (dev, test, train_sample, multilingual)."""
    p = ASSETS / f"{split}.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"no bundled split {split!r} at {p}")
    return p


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--splits", default="dev,test,train_sample,multilingual")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=sorted(AUDIO_FORMATS), default="flac",
                    help="flac (lossless, committed splits) or opus (lossy, ~5x smaller)")
    args = ap.parse_args(argv)
    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y espeak-ng flite")
    for split in args.splits.split(","):
        n = args.n_train if split == "train" else SPLIT_SIZES.get(split, 0)
        m = generate_split(args.out, split, n, args.seed, args.format)
        print(f"{split}: {sum(1 for _ in open(m))} utterances -> {m}")


if __name__ == "__main__":
    main()
