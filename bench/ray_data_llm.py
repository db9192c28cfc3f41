"""ray.data.llm's vLLM processor on ARK-ASR beside our transcriber, on the same clips, in one run.

    python bench/ray_data_llm.py --clips 40 [--model assets/models/student] [--input demo://heldout]

Why: docs/batch.md shows both ways to transcribe inside a Ray Data pipeline; this runs both on the
same held-out clips with the same model, engine settings and greedy decoding, and reports each
one's wall time (engine start included), WER against the references and how many transcripts
agree. ray.data.llm gets what it needs from us: the prompt ids and the audio as multimodal data
(vLLM's TokensPrompt, through our plugin, which vLLM finds by its entry point), and our
processor's cleanup in `postprocess`; decoding the audio is the user's `preprocess`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def ray_data_llm_processor(model: str, engine_kwargs: dict, max_new_tokens: int, batch_size: int, on_gpu: bool):
    """`ray.data.llm.build_processor` for ARK-ASR: rows with `audio` (a path) and any other columns in,
    the same rows plus pred_text / pred_text_raw out."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from ark_ray.model.processor import ArkAsrProcessor

    processor = ArkAsrProcessor.from_pretrained(model)
    prompt_ids, eos = processor.prompt_ids(1), processor.token_ids.eos
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=engine_kwargs, batch_size=batch_size, concurrency=1,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        # without a GPU the engine actor asks for one CPU instead of ray.data.llm's default GPU bundle
        placement_group_config=None if on_gpu else {"bundles": [{"CPU": 1}]})

    def preprocess(row: dict) -> dict:
        from ark_ray.audio import load_audio

        return dict(row, tokenized_prompt=prompt_ids, multimodal_data={"audio": load_audio(row["audio"])},
                    sampling_params=dict(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=[eos],
                                         detokenize=False))

    cleanup: dict = {}

    def postprocess(row: dict) -> dict:
        p = cleanup.get("p") or cleanup.setdefault("p", ArkAsrProcessor.from_pretrained(model))
        text, raw = p.decode([int(t) for t in row["generated_tokens"]])
        keep = {k: v for k, v in row.items() if k in ("audio", "text", "id")}
        return dict(keep, pred_text=text, pred_text_raw=raw)

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="demo://heldout")
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--model", default=str(REPO / "assets" / "models" / "student"))
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--max_num_seqs", type=int, default=16)
    ap.add_argument("--max_model_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8)
    a = ap.parse_args(argv)

    import ray
    import torch

    from ark_ray.config import EngineConfig, TranscribeConfig, load_config
    from ark_ray.data import build_transcriber
    from ark_ray.demo import heldout
    from ark_ray.engines.vllm_engine import llm_kwargs
    from ark_ray.eval.metrics import word_counts
    from ark_ray.runtime import init_ray

    on_gpu = torch.cuda.is_available()
    manifest = pathlib.Path(heldout.resolve(a.input))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:a.clips]]
    for r in rows:
        r["audio"] = str((manifest.parent / r["audio"]).resolve())
    items = [{"id": r["id"], "audio": r["audio"], "text": r["text"]} for r in rows]
    engine = EngineConfig(max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, num_gpus=1 if on_gpu else 0)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    results = {}
    t = time.perf_counter()
    cfg = load_config(TranscribeConfig, None, [f"--model={a.model}", f"--sampling.max_new_tokens={a.max_new_tokens}",
                                               f"--engine.max_num_seqs={a.max_num_seqs}",
                                               f"--engine.max_model_len={a.max_model_len}",
                                               f"--engine.num_gpus={1 if on_gpu else 0}", "--files_per_block=8"])
    ours = build_transcriber(cfg)(ray.data.from_items(items)).take_all()
    results["ark_ray transcriber"] = (time.perf_counter() - t, ours)

    kwargs = llm_kwargs(a.model, engine, on_gpu)
    kwargs.pop("model")
    t = time.perf_counter()
    theirs = ray_data_llm_processor(a.model, kwargs, a.max_new_tokens, a.batch_size, on_gpu)(
        ray.data.from_items(items)).take_all()
    results["ray.data.llm"] = (time.perf_counter() - t, theirs)

    audio_s = sum(r["duration"] for r in rows)
    by_id = {name: {r["id"]: r for r in out} for name, (_, out) in results.items()}
    out = {"clips": len(rows), "audio_s": round(audio_s, 1), "model": a.model}
    for name, (wall, got) in results.items():
        wer = sum(word_counts(r["text"], r["pred_text"] or "") for r in got)
        out[name] = {"rows": len(got), "wall_s": round(wall, 1), "wer": round(wer.rate, 4)}
        print(f"{name}: {len(got)} rows in {wall:.1f} s (engine start included), WER {wer.rate:.3f}", flush=True)
    a_ids, b_ids = by_id["ark_ray transcriber"], by_id["ray.data.llm"]
    same = sum(1 for k in a_ids if k in b_ids and a_ids[k]["pred_text"] == b_ids[k]["pred_text"])
    out["same_transcripts"] = same
    print(f"identical transcripts: {same} of {len(rows)}")
    print("RESULT_JSON " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
