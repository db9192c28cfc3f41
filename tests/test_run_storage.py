"""The run folder (ark_ray/data/run_storage.py) on a local disk and on S3 (moto on loopback):
atomic files, folders up and down, metrics.jsonl's buffer, uploads and truncation, bad URIs."""
from __future__ import annotations

import json
import pickle

import pytest

from ark_ray.config import S3Config
from ark_ray.data.run_storage import RunStorage
from ark_ray.data.s3 import StorageError

BUCKET = "run-storage"


@pytest.fixture(scope="module")
def s3cfg(s3_client, moto_endpoint):
    s3_client.create_bucket(Bucket=BUCKET)
    return S3Config(endpoint_url=moto_endpoint, access_key_id="test", secret_access_key="test", region="us-east-1")


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path, s3cfg):
    if request.param == "local":
        return RunStorage(tmp_path / "out")
    return RunStorage(f"s3://{BUCKET}/{request.node.name}/run", s3cfg, local_dir=tmp_path / "local")


def test_files_and_folders(run, tmp_path):
    assert not run.exists("a/b.json")
    assert run.write_json("a/b.json", {"x": 1}) == run.uri_of("a/b.json")
    assert run.read_json("a/b.json") == {"x": 1} and run.exists("a/b.json")
    run.write_text("a/b.json", "2")                                   # replaced whole
    assert run.read_text("a/b.json") == "2"
    assert run.list_dir("a") == {"b.json": False} and run.list_dir("nothing") == {}

    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "one.bin").write_bytes(b"1" * 1000)
    (src / "deep" / "two.txt").write_text("two")
    assert run.upload_dir(src, "ck/step_1") == ["deep/two.txt", "one.bin"]
    assert run.list_dir("ck") == {"step_1": True}
    back = tmp_path / "back"
    assert run.download_dir("ck/step_1", back, keep=lambda n: n != "one.bin") == ["deep/two.txt"]
    assert (back / "deep" / "two.txt").read_text() == "two" and not (back / "one.bin").exists()
    run.delete("ck/step_1")
    assert not run.exists("ck/step_1") and not run.exists("ck/step_1/one.bin")

    # what only exists in the local run folder reaches the run folder through upload()
    run.local("curves.png").write_bytes(b"png")
    assert run.upload("curves.png") == run.uri_of("curves.png") and run.read_bytes("curves.png") == b"png"
    assert run.upload("missing") is None
    # it pickles (ranks on other nodes use the driver's settings) and stays usable
    again = pickle.loads(pickle.dumps(run))
    assert again.read_text("a/b.json") == "2" and again.uri == run.uri


def test_metrics_log_buffer_upload_truncate(run):
    log = run.metrics_log(upload_every_s=3600)
    log.append({"step": 1})
    log.write(json.dumps({"step": 2}) + "\n")
    log.flush()                                     # within the interval: local only
    assert log.lines == 2
    assert run.is_local == run.exists("metrics.jsonl")
    log.flush(upload=True)                          # e.g. at a checkpoint
    assert [json.loads(x)["step"] for x in run.read_text("metrics.jsonl").splitlines()] == [1, 2]
    log.append({"step": 3})
    log.close()
    # a new process (a fresh node: no local buffer) continues the run's file, and cuts what a
    # resumed run redoes
    if not run.is_local:
        run.local("metrics.jsonl").unlink()
    m = pickle.loads(pickle.dumps(run)).metrics_log()
    assert m.lines == 3
    assert m.truncate(2) == 1 and m.lines == 2
    m.append({"step": 3, "redone": True})
    m.close()
    assert [json.loads(x) for x in run.read_text("metrics.jsonl").splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3, "redone": True}]


def test_uris(tmp_path, s3cfg):
    local = RunStorage(str(tmp_path / "x") + "/")
    assert local.uri == str(tmp_path / "x") and local.local_dir == tmp_path / "x"
    remote = RunStorage(f"s3://{BUCKET}/p/q/", s3cfg)
    assert remote.uri == f"s3://{BUCKET}/p/q" and remote.root == f"{BUCKET}/p/q"
    assert remote.local_dir.parts[-4:] == ("s3", BUCKET, "p", "q")     # under <tmp>/ark-ray-runs
    assert remote.for_ray_train() == (f"{BUCKET}/p/q", remote.fs)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        RunStorage("s3://no-such-bucket/run", s3cfg)
    with pytest.raises(StorageError, match="pyarrow"):
        RunStorage("nosuch://bucket/x")
    with pytest.raises(StorageError, match="only for a remote"):
        RunStorage(tmp_path / "y", local_dir=tmp_path / "z")


def test_checkpoints_pointer_written_last_and_pruned(run):
    """checkpoints/latest moves only at commit; a save that never committed is not used and is
    cleared by the next save of its step or pruned; the newest `keep` complete ones stay."""
    from ark_ray.train.checkpoints import CheckpointError, Checkpoints

    ck = Checkpoints(run, keep=2)
    assert ck.latest() is None and ck.prune() == []
    for step in (1, 2, 3):
        run.write_bytes(f"{ck.begin(step)}/deepspeed/shard.pt", b"s%d" % step)   # what the ranks upload
        ck.commit(step, {"state.json": {"step": step}})
    assert ck.latest() == 3 and ck.steps() == [2, 3]                            # step 1 pruned
    run.write_bytes(f"{ck.begin(4)}/deepspeed/shard.pt", b"half")               # the driver dies here
    assert ck.latest() == 3 and ck.read_json(3, "state.json") == {"step": 3}
    with pytest.raises(CheckpointError, match="already the committed"):
        ck.begin(3)
    run.write_bytes(f"{ck.begin(6)}/deepspeed/shard.pt", b"s6")               # a resumed run saving step 6
    assert ck.steps() == [2, 3, 6]                                              # the partial step 4 is gone
    ck.commit(6, {"state.json": {"step": 6}})
    assert ck.latest() == 6 and ck.steps() == [3, 6]
    run.write_text("checkpoints/latest", "step_9\n")
    with pytest.raises(CheckpointError, match="is not there"):
        ck.latest()
