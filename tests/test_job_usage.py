"""Bad usage of every job: one line on stderr (the problem and what to do), exit status 2, before Ray
or any model library is imported; and the run-folder rule (no silent overwrite). The jobs run as
subprocesses the way a user starts them, all at once (each one only parses and checks, so the
batch takes seconds); RAY_ADDRESS points at a port where nothing listens, so a job that got as far
as starting Ray would fail differently."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ark_ray.config import UserError

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
PY = sys.executable
HEAVY = ("ray", "torch", "transformers", "vllm", "deepspeed")

#: Runs a job as `python jobs/X.py ...` would (runpy, __main__) and records which heavy modules it
#: had imported when it ended.
RUNNER = """
import json, os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.environ["ARK_TEST_IMPORTED"], "w") as f:
        json.dump([m for m in {heavy!r} if m in sys.modules], f)
""".format(heavy=HEAVY)


def _cases(tmp) -> dict:
    """name -> (job, argv, text the one line must contain)."""
    (tmp / "preds.jsonl").write_text('{"text": "a b", "pred_text": "a b"}\n')
    (tmp / "metrics.jsonl").write_text('{"step": 1}\n')   # tmp holds a run (sft-run-there)
    preds = str(tmp / "preds.jsonl")
    jsonl_run = tmp / "jsonl_run"          # an earlier transcribe run's output, in JSONL
    jsonl_run.mkdir(exist_ok=True)
    (jsonl_run / "part-0123456789abcdef0123.jsonl").write_text('{"key": "a", "pred_text": "a"}\n')
    return {
        "evaluate-unknown-key": ("evaluate", ["--predictionz", preds], "evaluate: unknown config key predictionz "
                                 "(did you mean predictions?)"),
        "evaluate-missing": ("evaluate", ["--predictions", str(tmp / "nope.jsonl")], "nope.jsonl: no such file"),
        "evaluate-readonly-output": ("evaluate", ["--predictions", preds, "--output", "/proc/ark-usage/r.json"],
                                     "evaluate: output: cannot create /proc/ark-usage"),
        "evaluate-bad-value": ("evaluate", ["--predictions", preds, "--normalizer", "klingon"],
                               "normalizer: 'klingon' is not one of"),
        "transcribe-missing-input": ("transcribe", ["--input", str(tmp / "nope"), "--output", str(tmp / "out")],
                                     "transcribe: input: "),
        "transcribe-not-a-model": ("transcribe", ["--input", preds, "--output", str(tmp / "out"), "--model", str(tmp)],
                                   "not an HF-format model directory"),
        "sft-unknown-key": ("sft", ["--batchsize=4"], "sft: unknown config key batchsize (did you mean batch_size?)"),
        "opd-unknown-key": ("opd", ["--rollout_batchsize=4"], "opd: unknown config key rollout_batchsize "
                            "(did you mean rollout_batch_size?)"),
        "opd-missing-manifest": ("opd", ["--train_manifest", str(tmp / "nope.jsonl"), "--output_dir", str(tmp / "o")],
                                 "opd: train_manifest: " + str(tmp / "nope.jsonl") + " not found"),
        "opd-run-there": ("opd", [f"--student={REPO / 'assets/models/student'}",
                                  f"--teacher={REPO / 'assets/models/teacher'}", "--output_dir", str(tmp)],
                          "opd: output_dir: " + str(tmp) + " already holds a run (metrics.jsonl); pass --resume"),
        "transcribe-other-format": ("transcribe", ["--input", preds, "--output", str(jsonl_run), "--format", "parquet"],
                                    "holds 1 jsonl part file(s) of an earlier run, and a rerun skips their inputs, "
                                    "so --format parquet would write nothing new; pass --format jsonl"),
        "sft-missing-manifest": ("sft", ["--train_manifest", str(tmp / "nope.jsonl"), "--output_dir", str(tmp / "sft")],
                                 "sft: train_manifest: " + str(tmp / "nope.jsonl") + " not found"),
        "sft-run-there": ("sft", ["--train_manifest", preds, "--eval_manifest", "null", "--output_dir", str(tmp)],
                          "sft: output_dir: " + str(tmp) + " already holds a run (metrics.jsonl); pass --resume"),
    }


@pytest.fixture(scope="module")
def usage_runs(tmp_path_factory):
    """Every case started at once; name -> (returncode, stdout, stderr, heavy modules imported, seconds)."""
    tmp = tmp_path_factory.mktemp("usage")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": str(REPO)}
    procs = {}
    for name, (job, argv, _) in _cases(tmp).items():
        env_i = {**env, "ARK_TEST_IMPORTED": str(tmp / f"{name}.imported.json")}
        procs[name] = (time.perf_counter(), subprocess.Popen(
            [PY, "-c", RUNNER, str(REPO / "jobs" / f"{job}.py"), *argv], env=env_i, cwd=tmp,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for name, (t0, p) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        imported = json.loads((tmp / f"{name}.imported.json").read_text())
        out[name] = (p.returncode, stdout, stderr, imported, time.perf_counter() - t0)
    print({k: f"{v[4]:.1f} s" for k, v in out.items()})   # how long each took, for the report (-s)
    return out, _cases(tmp)


def test_bad_usage_is_one_line_and_exit_2(usage_runs):
    runs, cases = usage_runs
    wrong = {}
    for name, (rc, stdout, stderr, imported, _) in runs.items():
        want = cases[name][2]
        lines = stderr.strip().splitlines()
        if rc != 2 or len(lines) != 1 or want not in lines[0] or imported or "Traceback" in stderr:
            wrong[name] = (rc, stderr[-1500:], imported)
    assert wrong == {}


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run([PY, str(REPO / "jobs/evaluate.py"), "--predictions", str(tmp_path / "x.jsonl"), "--debug"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "EvalError" in r.stderr


def test_user_error_through_ray_is_still_one_line(capsys):
    """A task or actor that raised a UserError reaches the driver wrapped (RayTaskError carrying it as
    `cause`): still the one line."""
    from ark_ray.cli import run_job
    from ark_ray.data.listing import InputError

    class Wrapped(RuntimeError):   # what ray.exceptions.RayTaskError(...).as_instanceof_cause() carries
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last): ... remote frames ...")
            self.cause = cause

    def main(argv):
        raise Wrapped(InputError("input: s3://b/x not found"))

    with pytest.raises(SystemExit) as e:
        run_job("transcribe", main, [])
    assert e.value.code == 2
    assert capsys.readouterr().err == "transcribe: input: s3://b/x not found\n"


def test_system_python_says_to_activate_the_venv(capsys, monkeypatch):
    """`python jobs/X.py` before `source .venv/bin/activate`: a library the job needs is missing
    from the system Python; one line says which Python ran and to activate .venv."""
    from ark_ray.cli import run_job

    def main(argv):
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")

    monkeypatch.setattr(sys, "prefix", sys.base_prefix)          # as outside any virtual environment
    with pytest.raises(SystemExit) as e:
        run_job("transcribe", main, [])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("transcribe: No module named 'pyarrow' in ") and "source .venv/bin/activate" in err
    monkeypatch.setattr(sys, "prefix", sys.base_prefix + "/venv")  # inside one: a real bug, the traceback stays
    with pytest.raises(ModuleNotFoundError):
        run_job("transcribe", main, [])


# --------------------------------------------------------------------------- the run-folder rule
def test_claim_run_refuses_resumes_and_overwrites(tmp_path):
    from ark_ray.data.preflight import claim_run, open_output

    run = open_output(str(tmp_path / "run"), "output_dir")
    artefacts = ("metrics.jsonl", "checkpoints", "final")
    assert claim_run(run, resume=False, overwrite=False, artefacts=artefacts) == "new"
    assert claim_run(run, resume=True, overwrite=False, artefacts=artefacts) == "new"   # a first try with --resume
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "run" / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a run \(metrics.jsonl, checkpoints/\); pass --resume"):
        claim_run(run, resume=False, overwrite=False, artefacts=artefacts)
    assert claim_run(run, resume=True, overwrite=False, artefacts=artefacts) == "resume"
    with pytest.raises(UserError, match="exclude each other"):
        claim_run(run, resume=True, overwrite=True, artefacts=artefacts)
    assert claim_run(run, resume=False, overwrite=True, artefacts=artefacts) == "overwrite"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]   # only the run's own files


def test_s3_input_and_output_checked_up_front(aws_env, s3_client, monkeypatch):
    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    from ark_ray.data.listing import InputError
    from ark_ray.data.preflight import check_input, claim_run, open_output
    from ark_ray.data.s3 import StorageError

    s3_client.create_bucket(Bucket="usage")
    s3_client.put_object(Bucket="usage", Key="in/m.jsonl", Body=b'{"audio": "a.wav"}\n')
    check_input("s3://usage/in/m.jsonl", "input")
    check_input("s3://usage/in", "input")                       # a prefix
    with pytest.raises(InputError, match=r"input: s3://usage/in/none.jsonl not found"):
        check_input("s3://usage/in/none.jsonl", "input")
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        check_input("s3://no-such-bucket/m.jsonl", "train_manifest")
    with pytest.raises(StorageError, match="output_dir: .*bucket 'no-such-bucket' does not exist"):
        open_output("s3://no-such-bucket/run", "output_dir")
    run = open_output("s3://usage/run", "output_dir")           # the probe is written and deleted
    assert [o["Key"] for o in s3_client.list_objects_v2(Bucket="usage", Prefix="run").get("Contents", [])] == []
    s3_client.put_object(Bucket="usage", Key="run/metrics.jsonl", Body=b"{}\n")
    with pytest.raises(UserError, match="s3://usage/run already holds a run"):
        claim_run(run, resume=False, overwrite=False, artefacts=["metrics.jsonl"])
