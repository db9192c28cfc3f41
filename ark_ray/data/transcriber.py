"""The transcriber: any Ray Dataset with an audio column in, the same Dataset with transcripts out.

    transcribe = build_transcriber(TranscribeConfig(model="/models/ark", engine=EngineConfig(num_gpus=1)))
    ds = transcribe(ray.data.read_parquet("s3://bucket/clips/").filter(...))   # lazy, like any Dataset
    ds.write_parquet("s3://bucket/out/")

Why a Dataset -> Dataset function: Ray Data users compose pipelines (read, filter, join,
transcribe, evaluate, write), the way `ray.data.llm.build_processor` drops an LLM into one; the
batch job (`transcribe_pipeline.run_transcribe`) is just one such pipeline. Two stages:

  * decode: CPU tasks (`decode_stage.decode_batch`), one block of `files_per_block` rows each:
    read, decode, cut, resample to 16 kHz, flag silence; unusable input becomes an error row.
  * engines: a Ray Data actor pool (`engine_stage.EngineStage`) that autoscales between
    `min_engines` and `num_engines` actors (engine.num_gpus each) across the cluster's nodes and
    starts while the first blocks decode. Each actor holds `engine_calls` blocks at once so its
    vLLM always has queued clips; long clips are cut by the shared chunker.

Every input column is kept; each row gains pred_text, pred_text_raw, segments (the windows of a
clip the chunker cut), duration_s, silent, error and error_detail. A lost node costs nothing but
time: Ray Data reruns its tasks and restarts its engines elsewhere.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ark_ray.config import ConfigError, EngineConfig, TranscribeConfig

#: vLLM batch slots worth of clips each engine holds queued (engine_calls = 0).
QUEUED_CLIPS_PER_SLOT = 4
#: Memory a decode task asks for per row: 30 s at 16 kHz in float32, about three times over (the file's
#: samples, the resampled wave, the Arrow column).
DECODE_BYTES_PER_ROW = 8 << 20


def engine_pool(cfg: TranscribeConfig) -> tuple[int, int, EngineConfig]:
    """(min actors, max actors, each one's EngineConfig): `engines_per_gpu` engines share each GPU;
    with num_engines 0 the pool fills the cluster's GPUs (Ray must be up), on CPU one engine."""
    eng = cfg.engine
    if eng.num_gpus > 0:
        eng = dataclasses.replace(eng, num_gpus=eng.num_gpus / cfg.engines_per_gpu)
    most = cfg.num_engines
    if most <= 0 and eng.num_gpus > 0:
        import ray

        from ark_ray.runtime import init_ray

        init_ray(cfg.ray)
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < eng.num_gpus:
            raise ConfigError(f"engine.num_gpus={cfg.engine.num_gpus} but the cluster has {gpus:g} GPUs "
                              "(set engine.num_gpus=0 for CPU engine actors)")
        most = int(math.floor(gpus / eng.num_gpus + 1e-6))
    most = max(1, most)
    least = cfg.min_engines or most
    return min(least, most), most, eng


def engine_calls(cfg: TranscribeConfig) -> int:
    """Blocks an engine actor holds at once: enough queued clips to refill vLLM's batch as it drains."""
    if cfg.engine_calls > 0:
        return cfg.engine_calls
    return max(2, math.ceil(QUEUED_CLIPS_PER_SLOT * cfg.engine.max_num_seqs / cfg.files_per_block))


@dataclasses.dataclass
class TranscribeProcessor:
    """What `build_transcriber` returns: call it on a Dataset. Its fields say what it will start."""
    cfg: TranscribeConfig
    model_dir: str
    min_engines: int
    max_engines: int
    engine: EngineConfig          # each actor's (num_gpus shared per engines_per_gpu)
    calls: int                    # blocks each engine actor holds at once
    events: Optional[str] = None  # job_events channel the engines announce themselves on

    def __call__(self, ds):
        from ray.data import ActorPoolStrategy

        from ark_ray.data.decode_stage import decode_batch
        from ark_ray.data.engine_stage import EngineStage
        from ark_ray.runtime import engine_actor_options

        cfg = self.cfg
        # a decode task asks for the memory its block's waves take; being unlike the engine actors'
        # resources, it also keeps Ray Data from fusing decoding into them, so CPU tasks decode on any
        # node while the engines start
        ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=cfg.files_per_block, num_cpus=1,
                            memory=cfg.files_per_block * DECODE_BYTES_PER_ROW,
                            fn_kwargs=dict(audio_column=cfg.audio_column, s3=cfg.s3, max_audio_s=cfg.max_audio_s,
                                           silence_dbfs=cfg.silence_dbfs, silent_is_error=cfg.silent_is_error))
        return ds.map_batches(
            EngineStage, batch_format="pyarrow", batch_size=cfg.files_per_block,
            fn_constructor_kwargs=dict(model_dir=self.model_dir, engine=self.engine, sampling=cfg.sampling,
                                       events=self.events),
            compute=ActorPoolStrategy(min_size=self.min_engines, max_size=self.max_engines,
                                      max_tasks_in_flight_per_actor=self.calls,
                                      max_concurrent_calls_per_actor=self.calls, enable_true_multi_threading=True),
            **engine_actor_options(self.model_dir, self.engine))


def build_transcriber(cfg: TranscribeConfig, *, events: Optional[str] = None) -> TranscribeProcessor:
    """A function Dataset -> Dataset that transcribes `cfg.audio_column` (see the module doc).

    Checks the model and the engine's install here, in the driver, so a bad setting fails at
    once instead of in every actor. `events` (a job_events channel) makes each engine announce
    itself when built (the batch job's console prints it)."""
    model_dir = cfg.model_dir()
    cfg.engine.check_installed()
    least, most, eng = engine_pool(cfg)
    return TranscribeProcessor(cfg, model_dir, least, most, eng, engine_calls(cfg), events)
