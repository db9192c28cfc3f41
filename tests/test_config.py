"""The typed config system: precedence, coercion, errors, and that every key is documented."""
import dataclasses
import re

import pytest
import yaml

from ark_ray import config as C


@dataclasses.dataclass
class _Inner:
    """Inner section."""
    k: int = C.opt(1, "an int")
    name: str = C.opt("a", "a str")


@dataclasses.dataclass
class _Job:
    """A job."""
    steps: int = C.opt(10, "steps")
    lr: float = C.opt(1e-3, "lr")
    flag: bool = C.opt(False, "flag")
    maybe: C.Optional[str] = C.opt(None, "optional")
    mode: C.Literal["sync", "async"] = C.opt("async", "mode")
    inner: _Inner = C.opt(_Inner(), "inner section")
    items: list = C.opt([1, 2], "a list")


def test_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\ninner:\n  k: 5\n")
    cfg = C.parse_job_args(_Job, ["--config", str(f), "--inner.name=b", "--lr", "0.5", "--flag"])
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.inner.k, cfg.inner.name) == (20, 0.5, True, 5, "b")
    assert C.load_config(_Job).steps == 10


def test_mutable_defaults_are_not_shared():
    a, b = _Job(), _Job()
    a.items.append(3)
    assert b.items == [1, 2]


@pytest.mark.parametrize("arg,msg", [
    ("--stepz=3", "did you mean steps"),
    ("--steps=abc", "expected an integer"),
    ("--steps=1.5", "expected an integer"),
    ("--mode=fast", "not one of"),
    ("--inner.q=1", "unknown config key inner.q"),
    ("--flag=maybe", "true/false"),
])
def test_bad_values(arg, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.parse_job_args(_Job, [arg])


def test_missing_file():
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(_Job, "/nonexistent.yaml")


def test_every_key_documented():
    classes = C.documented_classes()
    for cls in classes:
        for key, _, _, doc in C.iter_keys(cls):
            assert doc.strip(), f"{cls.__name__}.{key} has no doc"


def test_docs_are_current(repo_root):
    classes = C.documented_classes()
    doc = repo_root / "docs" / "config.md"
    assert doc.read_text().strip() == C.render_markdown(classes).strip(), \
        "docs/config.md is stale: run `python -m ark_ray.config > docs/config.md`"


# Every cross-field rule of every config class, one case each: (class, overrides, the error's words).
# `*` marks an override list applied to the class's shipped config (opd_tiny.yaml for OPD).
RULES = [
    # OPD (jobs/configs/opd_tiny.yaml)
    (C.OpdConfig, ["--sampling.n=2"], "one rollout per clip"),
    (C.OpdConfig, ["--sync_every=0"], "sync_every must be >= 1"),
    (C.OpdConfig, ["--max_inflight=0"], "max_inflight must be >= 1"),
    (C.OpdConfig, ["--rollout_batch_size=0"], "rollout_batch_size must be >= 1"),
    (C.OpdConfig, ["--max_staleness=-1"], "max_staleness must be >= 0"),
    (C.OpdConfig, ["--topk=0"], "topk must be >= 1"),
    (C.OpdConfig, ["--num_rollout_workers=0"], "num_rollout_workers must be >= 1"),
    (C.OpdConfig, ["--steps=-1"], "steps must be >= 0"),
    (C.OpdConfig, ["--sampling.logprobs_topk=5"], "leave sampling.logprobs_topk at 0"),
    (C.OpdConfig, ["--save_every=-1"], "save_every must be >= 0"),
    (C.OpdConfig, ["--max_actor_restarts=-2"], "max_actor_restarts must be >= -1"),
    (C.OpdConfig, ["--tau=0"], "tau must be > 0"),
    (C.OpdConfig, ["--max_audio_s=0"], "max_audio_s must be > 0"),
    (C.OpdConfig, ["--teacher_engine.gpu_memory_utilization=1.5"],
     "teacher_engine.gpu_memory_utilization is a fraction"),
    (C.OpdConfig, ["--teacher_engine.backend=vllm"], "set teacher_backend=qwen3_asr"),
    (C.OpdConfig, ["--teacher_engine.backend=vllm", "--teacher_backend=qwen3_asr", "--tau=2"], "set tau=1"),
    (C.OpdConfig, ["--teacher_logprobs_k=8"], "only applies with teacher_engine.backend=vllm"),
    (C.OpdConfig, ["--teacher_engine.max_num_batched_tokens=64"], "only applies with teacher_engine.backend=vllm"),
    (C.OpdConfig, ["--teacher_engine=vllm"], "did you mean teacher_engine.backend=vllm?"),   # the key became a section
    (C.OpdConfig, ["--teacher_language=en"], "only applies to the qwen3_asr teacher"),
    (C.OpdConfig, ["--learner.grad_accum_steps=5"], "must divide steps"),
    (C.OpdConfig, ["--learner.use_gpu=true", "--learner.weight_sync=broadcast", "--learner.num_gpus=0.4",
                   "--rollout_engine.num_gpus=0.3"], "=broadcast needs learner rank 0 and every rollout engine on "
                                                     "different GPUs"),
    # learner section (errors carry the section's path)
    (C.OpdConfig, ["--learner.zero_stage=7"], "learner.zero_stage must be one of DeepSpeed's stages 0-3"),
    (C.OpdConfig, ["--learner.weight_sync_bucket_mb=0"], "learner.weight_sync_bucket_mb must be > 0"),
    (C.OpdConfig, ["--learner.weight_sync_retries=-1"], "learner.weight_sync_retries must be >= 0"),
    (C.OpdConfig, ["--learner.weight_sync=nccl"], "not one of"),
    (C.OpdConfig, ["--learner.micro_batch_size=-1"], "learner.micro_batch_size must be >= 0"),
    (C.OpdConfig, ["--learner.grad_accum_steps=0"], "learner.grad_accum_steps must be >= 1"),
    (C.OpdConfig, ["--learner.num_workers=0"], "learner.num_workers must be >= 1"),
    (C.OpdConfig, ["--learner.lr=0"], "learner.lr must be > 0"),
    (C.OpdConfig, ["--learner.min_lr_ratio=2"], "learner.min_lr_ratio is a fraction of lr"),
    (C.OpdConfig, ["--learner.betas=[0.9]"], "learner.betas must be two numbers"),
    (C.OpdConfig, ["--learner.grad_clip=-1"], "learner.grad_clip must be >= 0"),
    (C.OpdConfig, ["--learner.warmup_steps=-1"], "learner.warmup_steps must be >= 0"),
    (C.OpdConfig, ["--learner.weight_sync_timeout_s=0"], "learner.weight_sync_timeout_s must be > 0"),
    (C.OpdConfig, ["--learner.use_gpu=true", "--learner.num_gpus=2"], "one rank per card"),
    (C.OpdConfig, ["--learner.weight_sync=ipc"], "needs use_gpu=true"),
    # sampling and engine sections
    (C.OpdConfig, ["--sampling.temperature=-1"], "sampling.temperature must be >= 0"),
    (C.OpdConfig, ["--sampling.top_p=0"], "sampling.top_p must be in"),
    (C.OpdConfig, ["--sampling.max_new_tokens=0"], "sampling.max_new_tokens must be >= 1"),
    (C.TranscribeConfig, ["--sampling.logprobs_topk=-1"], "sampling.logprobs_topk must be >= 0"),
    (C.TranscribeConfig, ["--sampling.n=0"], "sampling.n must be >= 1"),
    (C.OpdConfig, ["--rollout_engine.dtype=fp8"], "rollout_engine.dtype 'fp8' is not one of"),
    (C.TranscribeConfig, ["--engine.device=tpu"], "engine.device 'tpu' is not auto, cpu"),
    (C.TranscribeConfig, ["--engine.max_num_seqs=0"], "engine.max_num_seqs must be >= 1"),
    (C.TranscribeConfig, ["--engine.gpu_memory_utilization=0"], "engine.gpu_memory_utilization is a fraction"),
    (C.TranscribeConfig, ["--engine.max_chunk_s=0"], "engine.max_chunk_s must be > 0"),
    (C.TranscribeConfig, ["--engine.num_gpus=-1"], "engine.num_gpus must be >= 0"),
    (C.TranscribeConfig, ["--engine.enable_chunked_prefill=false", "--engine.max_num_batched_tokens=512"],
     "a whole prompt must fit one step"),
    (C.TranscribeConfig, ["--ray.num_cpus=-1"], "ray.num_cpus must be >= 0"),
    (C.TranscribeConfig, ["--ray.namespace="], "ray.namespace is empty"),
    (C.TranscribeConfig, ["--s3.anonymous=true", "--s3.access_key_id=AK"], "s3.anonymous"),
    # transcribe (the checks that were in data/transcribe_pipeline.py)
    (C.TranscribeConfig, ["--files_per_block=0"], "files_per_block must be >= 1"),
    (C.TranscribeConfig, ["--engines_per_gpu=0"], "engines_per_gpu must be >= 1"),
    (C.TranscribeConfig, ["--num_engines=-1"], "num_engines must be >= 0"),
    (C.TranscribeConfig, ["--min_engines=3", "--num_engines=2"], "min_engines (3) must be <= num_engines (2)"),
    (C.TranscribeConfig, ["--max_audio_s=0"], "max_audio_s must be > 0"),
    (C.TranscribeConfig, ["--extensions=[]"], "extensions must list at least one"),
    (C.TranscribeConfig, ["--label_field="], "label_field is empty"),
    # serve (the checks that were in serve/app.py)
    (C.ServeConfig, ["--max_batch_size=8", "--max_ongoing_requests=4"], "or batches can never fill"),
    (C.ServeConfig, ["--max_audio_s=600", "--max_queued_requests=16"], "the most windows one 600 s upload"),
    (C.ServeConfig, ["--max_new_tokens=0"], "max_new_tokens must be >= 1"),
    (C.ServeConfig, ["--ingress_max_ongoing_requests=0"], "ingress_max_ongoing_requests must be >= 1"),
    (C.ServeConfig, ["--max_queued_requests=-2"], "max_queued_requests must be >= -1"),
    (C.ServeConfig, ["--max_upload_mb=0"], "max_upload_mb must be > 0"),
    (C.ServeConfig, ["--batch_wait_timeout_s=-1"], "batch_wait_timeout_s must be >= 0"),
    (C.ServeConfig, ["--api_key="], "api_key is empty"),
    # sft
    (C.SftConfig, ["--steps=0"], "steps must be >= 1"),
    (C.SftConfig, ["--batch_size=0"], "batch_size must be >= 1"),
    (C.SftConfig, ["--batch_size=2", "--learner.num_workers=4"], "every rank takes at least one row"),
    (C.SftConfig, ["--learner.grad_accum_steps=3"], "must divide steps (20)"),
    (C.SftConfig, ["--featurize_workers=0"], "featurize_workers must be >= 1"),
    (C.SftConfig, ["--eval_every=-1"], "eval_every must be >= 0"),
    (C.SftConfig, ["--max_audio_s=0"], "max_audio_s must be > 0"),
    (C.SftConfig, ["--text_field="], "text_field is empty"),
    (C.SftConfig, ["--model=/ckpt", "--model_overrides={num_hidden_layers: 1}"], "only apply to a `preset:NAME`"),
    (C.SftConfig, ["--learner.weight_sync=object_store"], "does nothing in SFT"),
    # evaluate
    (C.EvaluateConfig, ["--max_listed_errors=-1"], "max_listed_errors must be >= 0"),
    (C.EvaluateConfig, ["--pred_field=text"], "must name two different columns"),
    (C.EvaluateConfig, ["--predictions=[{a: 1}]"], "predictions must be paths"),
]


@pytest.mark.parametrize("cls,overrides,msg", RULES, ids=[" ".join(r[1]) for r in RULES])
def test_every_rule_refuses_its_case(repo_root, cls, overrides, msg):
    path = repo_root / "jobs/configs/opd_tiny.yaml" if cls is C.OpdConfig else None
    with pytest.raises(C.ConfigError, match=re.escape(msg)):
        C.load_config(cls, path, overrides)


@pytest.mark.parametrize("cls,old,new", [
    (C.TranscribeConfig, "--as_manifest", "label_field=text"),
    (C.TranscribeConfig, "--block_audio_s=240", "blocks are files_per_block rows"),
    (C.ServeConfig, "--model_dir=/m", "renamed to model"),
    (C.SftConfig, "--init_model=/m", "renamed to model"),
    (C.SftConfig, "--dev_manifest=d.jsonl", "renamed to eval_manifest"),
    (C.SftConfig, "--max_steps=3", "renamed to steps"),
    # every role's GPU share is `num_gpus` in its own section
    (C.OpdConfig, "--teacher_num_gpus=1", "renamed to teacher_engine.num_gpus"),
    (C.OpdConfig, "--teacher_num_cpus=1", "renamed to teacher_engine.num_cpus"),
    (C.OpdConfig, "--teacher_gpu_memory_utilization=0.3", "renamed to teacher_engine.gpu_memory_utilization"),
    (C.OpdConfig, "--teacher_max_model_len=512", "renamed to teacher_engine.max_model_len"),
    (C.OpdConfig, "--teacher_max_num_batched_tokens=0", "renamed to teacher_engine.max_num_batched_tokens"),
    (C.OpdConfig, "--learner.num_gpus_per_worker=1", "renamed to learner.num_gpus"),
    (C.SftConfig, "--learner.num_cpus_per_worker=1", "renamed to learner.num_cpus"),
])
def test_removed_keys_name_their_replacement(cls, old, new):
    with pytest.raises(C.ConfigError, match=f"{old[2:].split('=')[0]} was removed: .*{new}"):
        C.load_config(cls, None, [old])


def test_broadcast_is_refused_only_where_fractions_can_share_a_card(repo_root):
    path = repo_root / "jobs/configs/opd_tiny.yaml"
    gpu = ["--learner.use_gpu=true", "--learner.weight_sync=broadcast"]
    for ok in (["--learner.num_gpus=1", "--rollout_engine.num_gpus=0.6"],    # learner has its own card
               ["--learner.num_gpus=0.5", "--rollout_engine.num_gpus=0.6"],  # cannot fit on one
               ["--learner.num_gpus=0.5", "--rollout_engine.num_gpus=0"]):   # CPU engine
        C.load_config(C.OpdConfig, path, gpu + ok)
    C.load_config(C.OpdConfig, path, ["--learner.num_gpus=0.4", "--rollout_engine.num_gpus=0.3",
                                      "--learner.weight_sync=broadcast"])             # CPU learner: gloo


def test_shipped_configs_are_valid(repo_root):
    """Every YAML in the repository that holds job keys loads (and so passes every rule)."""
    for name in ("opd_tiny.yaml", "opd_ark06.yaml", "opd_qwen3_tiny.yaml"):
        C.load_config(C.OpdConfig, repo_root / "jobs/configs" / name)
    for name in ("sft_student_demo.yaml", "sft_teacher_demo.yaml"):
        C.load_config(C.SftConfig, repo_root / "jobs/configs" / name)
    apps = [yaml.safe_load(p.read_text())["applications"] for p in sorted((repo_root / "serve_configs").glob("*.yaml"))]
    service = yaml.safe_load((repo_root / "cluster/kuberay/rayservice.yaml").read_text())
    apps.append(service["spec"]["serveConfigV2"] if isinstance(service["spec"]["serveConfigV2"], list)
                else yaml.safe_load(service["spec"]["serveConfigV2"])["applications"])
    for (app,) in apps:
        C.load_config(C.ServeConfig, overrides=app["args"])
    for cls in C.job_config_classes():
        C.load_config(cls)   # the defaults pass too


def test_transcribe_model_and_backend_checked_in_the_driver(tmp_path):
    cfg = C.load_config(C.TranscribeConfig, overrides=[f"--model={tmp_path}"])
    with pytest.raises(C.ConfigError, match="no config.json"):
        cfg.model_dir()
    (tmp_path / "config.json").write_text("{}")
    assert cfg.model_dir() == str(tmp_path)
    C.EngineConfig(backend="hf").check_installed()      # hf needs nothing beyond the base install


def test_one_extension_list():
    from ark_ray.data import listing
    assert listing.DEFAULT_EXTENSIONS is C.AUDIO_EXTENSIONS
    assert tuple(C.TranscribeConfig().extensions) == C.AUDIO_EXTENSIONS


def test_evaluate_cli_style_and_normalizers():
    from ark_ray.eval import NORMALIZERS
    assert set(C.typing.get_args(C.typing.get_type_hints(C.EvaluateConfig)["normalizer"])) == set(NORMALIZERS)
    cfg = C.parse_job_args(C.EvaluateConfig, ["--predictions", "a.jsonl", "out/", "s3://b/p/", "--per-file",
                                              "--scored-dir", "d", "--normalizer=none"])
    assert (cfg.predictions, cfg.per_file, cfg.scored_dir, cfg.normalizer) == (
        ["a.jsonl", "out/", "s3://b/p/"], True, "d", "none")
    assert C.parse_job_args(C.EvaluateConfig, ["--predictions=2024"]).predictions == ["2024"]
    with pytest.raises(C.ConfigError, match="expected an integer"):
        C.parse_job_args(C.EvaluateConfig, ["--max_listed_errors", "1", "2"])
    with pytest.raises(C.ConfigError, match="predictions is empty"):
        C.EvaluateConfig().check_ready()


def test_evaluate_reads_yaml(tmp_path):
    f = tmp_path / "eval.yaml"
    f.write_text("predictions: [runs/a.jsonl, s3://b/preds/]\nnormalizer: chinese\n")
    cfg = C.parse_job_args(C.EvaluateConfig, ["--config", str(f), "--per_file=true"])
    assert (cfg.predictions, cfg.normalizer, cfg.per_file) == (["runs/a.jsonl", "s3://b/preds/"], "chinese", True)


def test_a_section_override_keeps_the_jobs_own_section_defaults():
    """`--sampling.temperature=1` changes that key only: the rest of OPD's sampling section keeps
    OPD's defaults (max_new_tokens 48), not SamplingConfig's (128); likewise learner.lr and the
    teacher engine's backend (hf, where EngineConfig's own default is vllm)."""
    cfg = C.load_config(C.OpdConfig, None, ["--sampling.temperature=1", "--learner.zero_stage=3",
                                            "--teacher_engine.num_gpus=0.5"])
    assert (cfg.sampling.temperature, cfg.sampling.max_new_tokens) == (1.0, 48)
    assert (cfg.learner.zero_stage, cfg.learner.lr) == (3, 2e-4)
    assert (cfg.teacher_engine.num_gpus, cfg.teacher_engine.backend, cfg.teacher_engine.gpu_memory_utilization) == \
        (0.5, "hf", 0.3)
