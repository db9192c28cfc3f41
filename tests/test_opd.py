"""OPD end to end: async/sync runs, seeded rollouts, resume, learner restarts (max_failures), node loss on a
simulated multi-node cluster (each role's node killed hard, replaced), ray job submit."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import ray

from ark_ray.config import OpdConfig, load_config
from ark_ray.faults import RecoveryFailed
from ark_ray.model.factory import make_tokenizer, save_random_model
from ark_ray.net import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
ENGINE = os.environ.get("ARK_TEST_OPD_ENGINE", "vllm")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("opd_models")
    tok = make_tokenizer("tiny")
    save_random_model(d / "teacher", "tiny", tokenizer=tok, seed=1, initializer_range=0.2)
    save_random_model(d / "student", "tiny", tokenizer=tok, seed=2, initializer_range=0.2)
    return d


def make_cfg(pair, out, **kw) -> OpdConfig:
    over = {"student": str(pair / "student"), "teacher": str(pair / "teacher"), "output_dir": str(out),
            "train_manifest": str(REPO / "assets/demo_corpus/train_sample.jsonl"),   # not the demo's 1000 clips
            "eval_manifest": str(REPO / "assets/demo_corpus/test.jsonl"),            # nor its 300 held-out ones
            "steps": 3, "rollout_batch_size": 4, "eval_max_samples": 4, "save_every": 1,
            "rollout_engine": {"backend": ENGINE, "max_num_seqs": 8, "max_model_len": 512},
            "sampling": {"max_new_tokens": 6}, "topk": 4}
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(over.get(k), dict):
            over[k] = {**over[k], **v}
        else:
            over[k] = v
    return load_config(OpdConfig, REPO / "jobs/configs/opd_tiny.yaml", over)


def run(cfg):
    from ark_ray.opd.controller import OpdController
    ctl = OpdController(cfg)
    try:
        return ctl.run(), ctl
    finally:
        ctl.shutdown()


def test_async_run_trains_syncs_and_exports(ray_local, pair, tmp_path):
    """Async OPD with every weight sync through the broadcast group (gloo on CPU; the other OPD
    runs here sync through the object store, `auto` on CPU)."""
    from ark_ray.opd.controller import OpdController

    ctl = OpdController(make_cfg(pair, tmp_path / "a", max_staleness=0, max_inflight=3,
                                 learner={"weight_sync": "broadcast", "weight_sync_timeout_s": 300,
                                          "weight_sync_collective_timeout_s": 60}))
    try:
        s = ctl.run()
        worker_version = ray.get(ctl.rollouts[0].get_version.remote())
    finally:
        ctl.shutdown()
    assert s["steps"] == 3 and s["mode"] == "async" and s["weight_sync"] == "broadcast"
    recs = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    syncs = [r for r in recs if r["kind"] == "sync"]
    recs = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    versions = [r["version"] for r in syncs]      # pushes made while one was in flight coalesce into the newest
    assert versions == sorted(set(versions)) and versions[-1] == ctl.version
    assert all(r["retries"] == 0 and r["sync_s"] > 0 for r in syncs)
    assert [h["version"] for h in ctl.weights.history] == versions          # every sync in metrics.jsonl
    assert worker_version == ctl.version                 # the final sync arrived
    assert all(r["kl"] > 0 and 4 <= r["union_size"] <= 8 for r in recs)
    # tau 1: the loss is the raw KL; queue depths are bounded by max_inflight (the trained batch excluded)
    assert all(r["loss"] == pytest.approx(r["kl"]) for r in recs)
    assert all(0 <= r["queue_rollout"] + r["queue_teacher"] + r["queue_learner"] < 3 for r in recs)
    # max_staleness 0 with 3 batches in flight: batches rolled out before a sync arrive stale
    assert s["dropped_stale"] > 0
    assert ctl.version >= 3                                  # one weight sync per step (+ the final one)
    # the export is the trained student in bf16: the student's tensors, decoder and encoder moved
    import torch

    from ark_ray.model import ArkAsrForConditionalGeneration
    final = ArkAsrForConditionalGeneration.from_pretrained(s["final_model"], dtype=torch.float32).state_dict()
    start = ArkAsrForConditionalGeneration.from_pretrained(pair / "student", dtype=torch.float32).state_dict()
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in start.items()}
    assert all(torch.equal(v, v.bfloat16().float()) for v in final.values())
    moved = [k for k in start if not torch.equal(final[k], start[k].bfloat16().float())]
    assert "lm_head.weight" in moved and any(k.startswith("audio_encoder.") for k in moved)
    for k in ("student_wer_before", "student_wer_after", "teacher_wer", "samples_per_s", "kl_first"):
        assert s[k] is not None


def _s3_json_lines(s3, bucket: str, key: str) -> list[dict]:
    return [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]


def test_s3_run_crashes_mid_checkpoint_then_resumes_on_a_fresh_cluster(
        ray_local, ray_cluster, pair, s3_client, aws_env, tmp_path, monkeypatch):
    """output_dir on S3 (moto on loopback), two learner ranks, sync mode (nothing overlaps; the loss
    carries tau^2). The first run, on this session's local Ray, checkpoints steps 1 and 2 and dies
    committing step 3, after both ranks uploaded their shards and before `latest`. Its local run
    folder is then deleted, and jobs/opd.py --resume runs on the simulated cluster (other nodes,
    other temp dirs): it continues from step 2, trains positions 0..15 each exactly once, and
    writes checkpoints, metrics, summary, curves, job.log and the final export to the bucket, and
    nothing to a local `s3:` folder."""
    from ark_ray.config import dump_yaml
    from ark_ray.opd.controller import OpdController

    bucket, uri = "opd-runs", "s3://opd-runs/probe"
    s3_client.create_bucket(Bucket=bucket)
    for k, v in aws_env.items():      # the driver's settings; the learner ranks get them pickled
        monkeypatch.setenv(k, v)
    cfg = make_cfg(pair, uri, mode="sync", steps=3, tau=2.0, eval_manifest=None, keep_checkpoints=1,
                   local_dir=str(tmp_path / "run1"), learner={"num_workers": 2},
                   sampling={"temperature": 1.0})     # sampled rollouts: their seeds come from `seed`
    ctl = OpdController(cfg)
    commit = ctl.ckpts.commit

    def crash_at_step_3(step, files):
        if step == 3:
            raise RuntimeError("simulated crash between the shards' upload and `latest`")
        return commit(step, files)
    ctl.ckpts.commit = crash_at_step_3
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            ctl.run()
    finally:
        ctl.shutdown()
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    latest = lambda: s3_client.get_object(Bucket=bucket, Key="probe/checkpoints/latest")["Body"].read().decode()
    assert latest().strip() == "step_2"
    for step in (2, 3):              # step 3: every rank's shards, but never committed
        assert {f"probe/checkpoints/step_{step}/deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                for r in (0, 1)} <= keys
    assert "probe/checkpoints/step_2/opd_state.json" in keys and "probe/checkpoints/step_3/opd_state.json" not in keys
    assert not any(k.startswith("probe/checkpoints/step_1/") for k in keys)     # keep_checkpoints=1
    recs = [r for r in _s3_json_lines(s3_client, bucket, "probe/metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in recs] == [1, 2, 3]      # uploaded at checkpoints and when the run ended
    assert all(r["kl"] > 0 and r["loss"] == pytest.approx(4.0 * r["kl"]) for r in recs)
    assert all(r["queue_rollout"] == r["queue_teacher"] == r["queue_learner"] == 0 for r in recs)

    # a brand-new cluster: none of the first run's local files, the job as a user runs it
    shutil.rmtree(tmp_path / "run1")
    cfg.resume, cfg.steps, cfg.local_dir = True, 4, str(tmp_path / "run2")
    (tmp_path / "resume.yaml").write_text(dump_yaml(cfg))
    ray_cluster.ensure_workers(2)
    proc = subprocess.run([sys.executable, str(REPO / "jobs/opd.py"), "--config", str(tmp_path / "resume.yaml")],
                          env=ray_cluster.env(PYTHONPATH=str(REPO), **aws_env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {uri}/checkpoints/step_2: step 2, version " in proc.stdout
    assert proc.stdout.count("\n") <= 60, proc.stdout          # the console (text mode reads each bar update, \r, as a line too)
    assert f"outputs and checkpoints: {uri}" in proc.stdout
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert latest().strip() == "step_4"
    assert {k.split("/")[2] for k in keys if k.startswith("probe/checkpoints/step_")} == {"step_4"}
    state = json.loads(s3_client.get_object(Bucket=bucket, Key="probe/checkpoints/step_4/opd_state.json")["Body"].read())
    assert state["step"] == 4 and state["data"]["low"] == 16 and state["data"]["above"] == []
    assert state["data"]["consumed_total"] == 16 and state["samples_trained"] == 16   # 0..15, each once
    metrics = _s3_json_lines(s3_client, bucket, "probe/metrics.jsonl")
    steps = [r for r in metrics if r["kind"] == "step"]
    assert [(r["step"], r["samples"]) for r in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]   # step 3 redone once
    # rollout sampling follows `seed` (each clip's seed from its data position): step 3, redone from
    # the same weights on another cluster, sampled the same tokens and so gave the same KL
    assert steps[2]["kl"] == pytest.approx(recs[2]["kl"], rel=1e-4)
    ck = [r for r in metrics if r["kind"] == "checkpoint"]
    assert [r["step"] for r in ck] == [1, 2, 3, 4]
    # the resumed run's ranks ran on the cluster's worker nodes and each uploaded from its own
    assert {r["rank"] for r in ck[-1]["ranks"]} == {0, 1}
    assert {r["node"] for r in ck[-1]["ranks"]} <= {n for n in ray_cluster.workers}
    summary = json.loads(s3_client.get_object(Bucket=bucket, Key="probe/summary.json")["Body"].read())
    assert summary["summary"]["steps"] == 4 and summary["summary"]["final_model"] == f"{uri}/final"
    assert {"probe/final/model.safetensors", "probe/final/config.json", "probe/curves.png",
            "probe/job.log"} <= keys
    assert not (tmp_path / "s3:").exists() and not (REPO / "s3:").exists()


def test_source_outlives_stale_drops_and_resumes(ray_local, pair, tmp_path):
    """A 5-clip manifest and max_staleness 0 with 3 batches in flight: the run drops more samples than
    any fixed spare, goes through several epochs and still trains every step, in async and then sync
    mode on one controller; its resume neither repeats nor skips a position."""
    import shutil

    src = [json.loads(x) for x in (REPO / "assets/demo_corpus/train_sample.jsonl").read_text().splitlines()][:5]
    for r in src:   # manifest paths are relative to the manifest's folder
        r["audio"] = str((REPO / "assets/demo_corpus" / r["audio"]).resolve())
    manifest = tmp_path / "five.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in src))
    out = tmp_path / "d"
    from ark_ray.opd.controller import OpdController
    cfg = make_cfg(pair, out, steps=4, max_staleness=0, max_inflight=3, save_every=0, eval_manifest=None,
                   train_manifest=str(manifest), rollout_engine={"backend": "hf"})   # engine-agnostic: the cheaper one
    ctl = OpdController(cfg)
    try:
        ctl.run_async()
        ctl.drain()
        ctl.cfg.steps = 6
        ctl.run_sync()
        assert ctl.step == 6
        assert ctl.data.low // 5 >= 1                          # past the first epoch
        assert ctl.dropped_stale > 0
        assert ctl.data.consumed_total == len(ctl.data.consumed())   # nothing consumed twice
        ctl.save()
        consumed = ctl.data.consumed()
        # a learner rank lost with max_failures used up: one line naming the node, the role and --resume
        ctl.cfg.max_failures, ctl.cfg.steps = 0, 8
        node = ctl.learner.nodes[0]
        ray.kill(ctl.learner.workers[0])
        with pytest.raises(RecoveryFailed) as failed:
            ctl.run_sync()
        line = str(failed.value)
        assert "\n" not in line and f"lost node {node[:12]} (learner rank 0)" in line
        assert "max_failures=0" in line and "--resume=true" in line and "checkpoint of step 6" in line
    finally:
        ctl.shutdown()
    s2, c2 = run(make_cfg(pair, out, steps=8, mode="sync", resume=True, save_every=0, eval_manifest=None,
                          train_manifest=str(manifest), max_staleness=0, rollout_engine={"backend": "hf"}))
    assert s2["steps"] == 8
    assert consumed < c2.data.consumed()
    assert c2.data.consumed_total == len(c2.data.consumed())
    assert c2.data.consumed() == set(range(c2.data.low))    # a prefix: no position skipped


def _records(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def trained_positions(records: list[dict]) -> list[int]:
    """Every position the final model was trained on (or dropped as stale), from metrics.jsonl: a
    learner restart's record rewinds to its checkpoint, whose later steps were done again."""
    steps: dict[int, dict] = {}
    for r in records:
        if r["kind"] == "recovery" and r["role"] == "learner rank":
            steps = {k: v for k, v in steps.items() if k <= r["from_step"]}
        elif r["kind"] == "step":
            steps[r["step"]] = r
    return sorted(p for r in steps.values() for p in r["positions"] + r["stale_positions"])


def test_opd_survives_losing_the_node_of_each_role(ray_cluster, pair, tmp_path):
    """`python jobs/opd.py` on a multi-node cluster (a head without CPUs, worker nodes): the node of
    the rollout worker, then the teacher's, then the learner's is removed hard mid-run
    (allow_graceful=False: a spot instance vanishing), each after the previous recovery, and a
    replacement node joins each time. Each role is pinned to a node type of its own (a custom
    resource, as cluster/*.yaml pin them), so each loss is one role's. The run finishes every step,
    trains every data position exactly once, and reports each recovery (console line naming the
    lost node, metrics.jsonl record, summary)."""
    ray_cluster.ensure_workers(2)          # the generic nodes: audio decoding tasks
    pins = {"rollout worker": "opd_rollout", "teacher": "opd_teacher", "learner rank": "opd_learner"}
    role_nodes = {role: ray_cluster.add_worker(num_cpus=2, resources={"sim_node": 1, pin: 1})
                  for role, pin in pins.items()}
    ray_cluster.cluster.wait_for_nodes()
    out = tmp_path / "run"
    steps, batch = 20, 4
    cmd = [sys.executable, str(REPO / "jobs" / "opd.py"), f"--student={pair / 'student'}",
           f"--teacher={pair / 'teacher'}", f"--output_dir={out}",
           f"--train_manifest={REPO / 'assets/demo_corpus/train_sample.jsonl'}",
           "--eval_manifest=null", f"--steps={steps}", f"--rollout_batch_size={batch}", "--sampling.max_new_tokens=8",
           "--sampling.temperature=1.0", "--topk=4", "--save_every=3", "--max_staleness=1000", "--max_inflight=2",
           "--rollout_engine.backend=hf", "--recovery_timeout_s=300", "--max_failures=2",
           "--rollout_engine.resources={opd_rollout: 1}", "--teacher_engine.resources={opd_teacher: 1}",
           "--learner.resources={opd_learner: 1}"]
    proc = subprocess.Popen(cmd, env=ray_cluster.env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"

    def wait_for(done, what: str, timeout_s: float = 600):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recs = _records(metrics)
            if done(recs):
                return recs
            assert proc.poll() is None, f"the job ended before {what}:\n" + proc.stdout.read()[-5000:]
            time.sleep(0.3)
        raise AssertionError(f"no {what} within {timeout_s} s")

    killed = {}
    try:
        for role, pin in pins.items():
            seen = len([r for r in _records(metrics) if r["kind"] == "recovery"])
            last = max([r["step"] for r in _records(metrics) if r["kind"] == "step"], default=0)
            wait_for(lambda recs: any(r["kind"] == "step" and r["step"] >= last + 2 for r in recs),
                     f"two steps before losing the {role}'s node")
            killed[role] = role_nodes[role].node_id
            role_nodes[role] = ray_cluster.replace(killed[role], num_cpus=2, resources={"sim_node": 1, pin: 1})
            wait_for(lambda recs: any(r["role"] == role for r in [r for r in recs if r["kind"] == "recovery"][seen:]),
                     f"the {role}'s recovery")
        console, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        for node in role_nodes.values():      # the shared cluster as this test found it
            if node.node_id in ray_cluster.workers:
                ray_cluster.kill(node.node_id)
    assert proc.returncode == 0, console[-6000:]
    recs = _records(metrics)
    recoveries = [r for r in recs if r["kind"] == "recovery"]
    assert [r["role"] for r in recoveries] == list(pins)           # one recovery per loss, nothing else
    for r, (role, node) in zip(recoveries, killed.items()):        # each names the node it was lost with
        assert r["lost_node"] == node and r["restarted"] and r["node"] != node
        assert f"recovered {role} 0 in" in console and f"lost with node {node[:12]}" in console
    assert recoveries[0]["weights_version"] >= 1                    # the restarted rollout worker got weights
    assert recoveries[2]["from_step"] > 0 and recoveries[2]["from_step"] % 3 == 0   # a checkpoint (save_every 3)
    # every data position trained exactly once: none skipped, none twice
    assert trained_positions(recs) == list(range(steps * batch))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["steps"] == steps and summary["summary"]["recoveries"] == 3
    positions = summary["data_positions"]
    assert positions["low"] == positions["consumed_total"] == steps * batch and positions["above"] == []


@pytest.mark.slow
def test_ray_job_submit(pair, tmp_path):
    """`ray job submit --working-dir . -- python jobs/opd.py ...` against a local CPU-only `ray start
    --head`, both from a plain shell (none of scripts/env.sh's or the test session's variables) and
    with the default rollout backend (vllm-cpu): the job sets what its engines need itself."""
    ray_bin = pathlib.Path(sys.executable).parent / "ray"
    tmp = pathlib.Path(f"/tmp/arkjob{os.getpid()}")
    # a plain shell: PATH and HOME only (Ray's auth and usage-stats switches are the cluster's set-up)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, dash = free_port(), free_port()
    head = subprocess.run([str(ray_bin), "start", "--head", f"--port={gcs}", "--num-cpus=6",
                           f"--temp-dir={tmp}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dash}", "--include-dashboard=true", "--disable-usage-stats",
                           # explicit ports: the defaults (agent 52365, ...) collide with the
                           # session's own local Ray, and then the job agent never registers
                           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                           f"--ray-client-server-port={free_port()}"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stderr
    try:
        models = tmp_path / "models"
        shutil.copytree(pair, models)
        cmd = [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git", ".stage", ".whl"]}),
               "--", sys.executable, "jobs/opd.py", f"--student={models}/student", f"--teacher={models}/teacher",
               f"--output_dir={tmp_path}/job", f"--train_manifest={REPO}/assets/demo_corpus/train_sample.jsonl",
               f"--eval_manifest={REPO}/assets/demo_corpus/test.jsonl", "--steps=2", "--rollout_batch_size=4", "--eval_max_samples=4",
               "--sampling.max_new_tokens=6", "--topk=4"]            # the default backend: vllm (CPU)
        for _ in range(24):  # the dashboard agent registers a few seconds after `ray start`
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
            if "No available agent to submit job" not in r.stdout + r.stderr:
                break
            time.sleep(5)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr)
        assert "student_wer_after" in r.stdout
        done = json.loads((tmp_path / "job/summary.json").read_text())
        assert done["summary"]["steps"] == 2 and done["config"]["rollout_engine"]["backend"] == "vllm"
    finally:
        out = subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for pid in subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
