"""SFT on Ray Train (jobs/sft.py): the data order; on the simulated cluster with output_dir on S3, a
learner node lost mid-run (the group restarts from the checkpoint), lost again with the restarts
used up (one error line), then `--resume` on another cluster; the manifest checks that come before
any training."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ark_ray.config import SftConfig, UserError, load_config
from ark_ray.data.manifest import ManifestError, read_manifest
from ark_ray.train.sft import SftDriver, cut_after
from ark_ray.train.sft_input import positions_of, rank_of, row_at

DEMO = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo_corpus"
TINY = ["--model=preset:tiny", "--learner.num_workers=2", "--learner.num_cpus=1", "--featurize_workers=1",
        "--batch_size=4", "--save_every=2"]


def test_data_order_is_the_seeded_permutation_split_over_ranks():
    n, seed, b, world = 7, 3, 4, 3
    rows = np.arange(n)
    idx, pos = positions_of(rows, n, seed, start=5, end=23)
    assert sorted(pos) == list(range(5, 23))                                # every position once
    assert all(row_at(p, n, seed) == rows[i] for i, p in zip(idx, pos))     # epoch e: permutation(seed + e)
    assert [row_at(p, n, seed) for p in range(n)] == list(np.random.default_rng(seed).permutation(n))
    ranks = rank_of(np.arange(8), b, world)
    assert ranks.tolist() == [0, 1, 2, 0, 0, 1, 2, 0]                       # rows r, r + world, ... of a step


def test_metrics_cut_keeps_recoveries_and_steps_up_to_the_checkpoint():
    recs = [{"step": 1}, {"step": 2}, {"step": 3}, {"event": "recovery"}, {"step": 3}, {"step": 4}, {"step": 5}]
    lines = [json.dumps(r) for r in recs]
    assert cut_after(lines, 2) == 4           # step 3 of the first try went with the recovery
    assert cut_after(lines, 4) == 6
    assert cut_after(lines[:3], 0) == 0


def _load_job(repo_root):
    spec = importlib.util.spec_from_file_location("job_sft", repo_root / "jobs" / "sft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected_ids(manifest: pathlib.Path, seed: int, steps: int, batch: int) -> list[list[str]]:
    rows = read_manifest(manifest, skip_bad_rows=True)
    return [[rows[row_at(p, len(rows), seed)]["id"] for p in range(s * batch, (s + 1) * batch)] for s in range(steps)]


def _manifest(tmp: pathlib.Path, bad_line: bool) -> pathlib.Path:
    lines = (DEMO / "train_sample.jsonl").read_text().splitlines()[:12]
    rows = [json.loads(x) for x in lines]
    for r in rows:
        r["audio"] = str(DEMO / r["audio"])
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if bad_line:
        text += '{"id": "broken", "text": "no audio field"}\n'
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_text(text)
    return tmp / "train.jsonl"


def _start(args: list[str], env: dict, log: pathlib.Path, repo_root) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(repo_root / "jobs" / "sft.py"), *args], env=env, cwd=log.parent,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for(cond, proc: subprocess.Popen, timeout_s: float, log: pathlib.Path, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _records(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _learner_node(ray_cluster) -> str:
    nodes = {a.node_id for a in ray_cluster.actors("RayTrainWorker")}
    assert len(nodes) == 1, f"both learner ranks in one placement group on one node (STRICT_PACK), got {nodes}"
    return nodes.pop()


def _check_steps_once(recs: list[dict], manifest: pathlib.Path, steps: int, batch: int) -> None:
    """Every step recorded once, with the rows the seeded order gives it: none skipped, none twice."""
    trained = [r for r in recs if "step" in r and r.get("event") is None]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    assert [r["positions"] for r in trained] == [[s * batch, (s + 1) * batch] for s in range(steps)]
    assert [r["ids"] for r in trained] == _expected_ids(manifest, 0, steps, batch)
    assert all(r["loss"] == r["loss"] and r["samples"] == batch for r in trained)


def test_cluster_run_recovers_a_lost_node_stops_at_max_failures_and_resumes_from_s3(
        ray_cluster, ray_local, tmp_path, repo_root, s3_client, aws_env, monkeypatch):
    """SFT on the simulated cluster with output_dir on S3 (moto), max_failures=1. The learner ranks'
    node is removed hard after the step-2 checkpoint (a replacement joins): Ray Train restarts the
    group from it, visibly. Their node is removed again after the step-4 checkpoint: restarts are
    used up, and the job ends with one line naming the node and --resume. `--resume` then goes on
    from the bucket on another cluster (the test's own Ray: other nodes, nothing local of the first
    run) and finishes. Every step is trained once on the rows the seeded order gives it; a bad
    manifest line is skipped and counted; export, summary, job.log and every rank's shards are in
    the bucket; a new run into the same output_dir without --resume is refused."""
    import ray

    ray_cluster.ensure_workers(2)
    s3_client.create_bucket(Bucket="sft-runs")
    uri, steps = "s3://sft-runs/tiny", 6
    manifest = _manifest(tmp_path, bad_line=True)
    args = [*TINY, f"--train_manifest={manifest}", f"--steps={steps}", f"--output_dir={uri}", "--skip_bad_rows=true"]

    def get(key: str) -> str:
        try:
            return s3_client.get_object(Bucket="sft-runs", Key=f"tiny/{key}")["Body"].read().decode()
        except s3_client.exceptions.NoSuchKey:
            return ""

    def committed(step: int) -> bool:
        return f'"step_{step}"' in get("checkpoints/checkpoint_manager_snapshot.json")

    log = tmp_path / "first.term"
    proc = _start([*args, "--eval_manifest=null", "--max_failures=1"], ray_cluster.env(**aws_env), log, repo_root)
    try:
        _wait_for(lambda: committed(2), proc, 600, log, "the step-2 checkpoint")
        first = _learner_node(ray_cluster)
        ray_cluster.replace(first)
        _wait_for(lambda: committed(4), proc, 600, log, "the step-4 checkpoint after the restart")
        second = _learner_node(ray_cluster)
        assert second != first
        ray_cluster.replace(second)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    term = log.read_text()
    assert proc.returncode == 1, term[-3000:]
    line = next(x for x in term.splitlines() if x.startswith("recovery 1:"))
    assert first[:12] in line and "learner rank(s) 0,1 lost" in line and "from the checkpoint at step 2" in line
    (err,) = [x for x in term.splitlines() if x.startswith("error: ")]
    assert second in err and "learner rank(s) 0,1" in err and "max_failures=1" in err
    assert "the last checkpoint is step 4" in err and "--resume" in err and "Traceback" not in term
    assert "skipped 1 bad row(s)" in term and not (tmp_path / "s3:").exists()

    # another cluster: the test's own Ray (its head node), nothing local of the first run
    local_run = pathlib.Path(next(x for x in term.splitlines() if "logs: " in x).split("logs: ")[1]).parent
    shutil.rmtree(local_run)
    shutil.rmtree(pathlib.Path("/tmp/ark-ray-models"), ignore_errors=True)
    env = dict(os.environ, **aws_env, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    log2 = tmp_path / "second.term"
    proc = _start([*args, "--resume", f"--eval_manifest={DEMO / 'dev.jsonl'}", "--eval_max_samples=2"], env, log2,
                  repo_root)
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, log2.read_text()[-3000:]
    term = log2.read_text()
    assert "resuming s3://sft-runs/tiny after step 4" in term
    # the console: a few lines (text mode reads each bar update, \r, as a line too), the libraries in job.log
    assert term.count("\n") <= 60 and "note: preset:tiny is a randomly initialised model" in term, term

    recs = _records(get("metrics.jsonl"))
    _check_steps_once(recs, manifest, steps, 4)
    (rec,) = [r for r in recs if r.get("event") == "recovery"]
    assert rec["lost_nodes"] == [first] and rec["lost_ranks"] == [0, 1] and rec["restored_step"] == 2
    assert first not in rec["nodes"] and rec["redone_steps"] == list(range(3, 3 + len(rec["redone_steps"])))
    s = json.loads(get("summary.json"))["summary"]
    assert (s["steps"], s["recoveries"], s["skipped_bad_rows"], s["train_rows"], s["dev_n"]) == (steps, 1, 1, 12, 2)
    assert 0 <= s["dev_wer"] and s["final_model"] == f"{uri}/final"
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="sft-runs", Prefix="tiny/")["Contents"]}
    shards = {f"tiny/checkpoints/step_{steps}/deepspeed/{f}" for f in (
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt")}
    assert shards | {"tiny/summary.json", "tiny/final/model.safetensors", "tiny/final/config.json",
                     "tiny/job.log"} <= keys

    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=r"output_dir: s3://sft-runs/tiny already holds a run .*pass --resume"):
        _load_job(repo_root).main([*args, "--eval_manifest=null"])


def test_bad_manifest_rows_are_refused_before_training(ray_local, tmp_path):
    manifest = _manifest(tmp_path, bad_line=True)
    cfg = load_config(SftConfig, None, [*TINY, f"--train_manifest={manifest}", "--eval_manifest=null",
                                        f"--output_dir={tmp_path / 'out'}"])
    with pytest.raises(ManifestError, match=r"(?s)1 bad row.*train.jsonl:13.*audio"):
        SftDriver(cfg).run()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_local_ray_gets_a_cpu_for_the_audio_beside_the_learner_ranks(repo_root, monkeypatch):
    """Ray Train keeps the ranks' CPUs from Ray Data: on a 2-core machine two 1-CPU ranks left none to
    read audio with (the run waited forever). A local Ray gets enough logical CPUs; a cluster, or a
    num_cpus the user set, is left alone."""
    job = _load_job(repo_root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    args = ["--learner.num_workers=2", "--learner.num_cpus=1", "--featurize_workers=2"]
    assert job.local_ray_cpus(load_config(SftConfig, None, args)).ray.num_cpus == 4
    assert job.local_ray_cpus(load_config(SftConfig, None, [*args, "--ray.num_cpus=3"])).ray.num_cpus == 3
    assert job.local_ray_cpus(load_config(SftConfig, None, ["--learner.num_workers=1"])).ray.num_cpus is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert job.local_ray_cpus(load_config(SftConfig, None, args)).ray.num_cpus is None
