"""Shared test fixtures: one local Ray per session, temp dirs, the repo root."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no VLLM_CPU_KVCACHE_SPACE: CPU vLLM engines size their own KV cache (ark_ray/engines/cpu_memory.py)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ark_ray.net import free_port  # noqa: E402  (after the environment above: importing ark_ray may load transformers)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


def _die_with_parent() -> None:
    """Child side of a fork: SIGTERM this process when pytest dies, even by SIGKILL (Linux)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_head(tmp: str, num_cpus: int) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in its own process group; returns it and the GCS address.

    Every port is explicit (free now) or random: `ray.init(address="local")` always binds the
    dashboard agent to 52365, so a second test session (or a `ray start --head`) on the same
    machine would find it taken and run without the agent's HTTP service (no job submission).
    `--block` keeps the head tied to this process: the process group is stopped at teardown;
    should pytest die first, `ray start` gets SIGTERM and Ray's reaper stops the rest.
    """
    ray_bin = pathlib.Path(sys.executable).with_name("ray")
    gcs = free_port()
    log = open(os.path.join(tmp, "ray_start.log"), "w")
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={num_cpus}",
           f"--temp-dir={tmp}", "--include-dashboard=false",
           "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--ray-client-server-port={free_port()}"]
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM: stop now, no drain
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    address_file = pathlib.Path(tmp, "ray_current_cluster")   # written once the head is up
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if address_file.is_file() and address_file.read_text().strip().endswith(f":{gcs}"):
            return proc, address_file.read_text().strip()
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    _stop_group(proc)
    raise RuntimeError("ray start --head failed:\n" + pathlib.Path(log.name).read_text()[-4000:])


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (GCS, raylet, agents), SIGKILL what lingers; workers
    exit with their raylet."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()                          # reap `ray start` so the group can empty
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray head for the whole session (started once: start-up costs ~5-10 s), on free ports.

    Logical CPUs are oversubscribed (8 on a 2-core box) so that a rollout actor, a teacher
    actor and two learner ranks can coexist in one test, as they would on a real node.
    """
    import ray

    proc = None
    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="ark-ray-", dir="/tmp")
        proc, address = _start_head(tmp, int(os.environ.get("ARK_TEST_RAY_CPUS", "8")))
        try:
            ray.init(
                address=address,
                log_to_driver=False,
                runtime_env={"env_vars": {k: os.environ[k] for k in (
                    "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE") if k in os.environ}},
            )
        except BaseException:
            _stop_group(proc)
            raise
    yield ray
    ray.shutdown()
    if proc is not None:
        _stop_group(proc)


@pytest.fixture(scope="session")
def stop_serve(ray_local):
    """`stop_serve()`: serve.shutdown() on `ray_local`, then wait until Serve's controller and
    proxies are gone. serve.shutdown() gives up after 30 s and returns with them still stopping (a
    loaded box); a `serve.start` in the next module would then find the old proxy by its name while
    it is being killed and fail with ActorDiedError."""
    def stop(timeout_s: float = 300) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        deadline = time.monotonic() + timeout_s
        while left := [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]:
            assert time.monotonic() < deadline, f"Serve actors still alive {timeout_s} s after shutdown: {left}"
            time.sleep(0.5)

    return stop


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3-protocol server (moto) on loopback for the whole session; its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def aws_env(moto_endpoint):
    """The AWS_* variables that point a job (or pyarrow, boto3) at `moto_endpoint`."""
    return {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_client(moto_endpoint):
    """A boto3 client of `moto_endpoint` (tests create their own buckets: names must differ)."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="test",
                        aws_secret_access_key="test", region_name="us-east-1")


class RayMetrics:
    """The ark_* series Ray's metrics agent exports on this session's node, read as Prometheus does.

    Ray exports what a process recorded every few seconds (10 s by default), so tests poll.
    """

    def __init__(self, ray):
        from ark_ray.metrics import REGISTRY

        (node,) = [n for n in ray.nodes() if n["Alive"]]
        self.url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        self.labels = {k for s in REGISTRY.values() for k in s.tag_keys} | {"le"}

    @staticmethod
    def key(name: str, **labels) -> tuple:
        """A key of `scrape`: key("ray_ark_serve_requests_total", route="/health", status=200)."""
        return name, frozenset((k, str(v)) for k, v in labels.items())

    def scrape(self, worker_ids=None) -> dict:
        """{(series name, frozenset(ark labels)): value}; Ray's own labels (WorkerId, SessionName,
        ...) are dropped and the workers' values summed, unless `worker_ids` names those to keep."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        body = urllib.request.urlopen(self.url, timeout=10).read().decode()
        out: dict = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if not s.name.startswith("ray_ark_"):
                    continue
                if worker_ids is not None and s.labels.get("WorkerId") not in worker_ids:
                    continue
                key = (s.name, frozenset((k, v) for k, v in s.labels.items() if k in self.labels))
                out[key] = out.get(key, 0.0) + s.value
        return out

    def wait_until(self, done, worker_ids=None, timeout_s: float = 90) -> dict:
        """Poll `scrape(worker_ids)` until `done(values)` holds (or time is up); the last values."""
        deadline = time.monotonic() + timeout_s
        while True:
            values = self.scrape(worker_ids)
            if done(values) or time.monotonic() > deadline:
                return values
            time.sleep(1)

    def wait_for_increase(self, before: dict, want: dict, timeout_s: float = 90) -> dict:
        """Poll until every series in `want` has grown by at least its value since `before`;
        returns the growth of every series (so a test can check it is exactly what it caused)."""
        def growth(now: dict) -> dict:
            return {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}

        now = self.wait_until(lambda v: all(growth(v).get(k, 0.0) >= n for k, n in want.items()),
                              timeout_s=timeout_s)
        return growth(now)


@pytest.fixture(scope="session")
def ray_metrics(ray_local) -> RayMetrics:
    return RayMetrics(ray_local)


class SimCluster:
    """A simulated multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head with
    no CPUs (so every actor and task lands on a worker node) and worker nodes of `cpus` CPUs each.

    This test process does not connect to it (it stays on `ray_local`): jobs run against it as
    subprocesses with RAY_ADDRESS set, as under `ray job submit`. `kill(node_id)` removes a node hard
    (`allow_graceful=False`: a spot instance vanishing); `replace(node_id)` also adds a fresh node,
    as an autoscaler would. Worker nodes get the resource {"sim_node": 1} for tests that pin work,
    the head {"sim_head": 1} for work that must outlive every node loss (e.g. a Serve ingress).
    """

    def __init__(self, n_workers: int = 2, cpus: int = 4, object_store_mb: int = 300):
        from ray.cluster_utils import Cluster

        self.cpus, self.object_store = cpus, object_store_mb * 2**20
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
            num_cpus=0, gcs_server_port=free_port(), include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=free_port(), dashboard_agent_listen_port=free_port(),
            object_store_memory=self.object_store, resources={"sim_head": 1},
            # a lost node is declared dead after ~10 s of missed health checks (default ~15-30 s);
            # not shorter: a raylet on this loaded 2-core box must not be declared dead by mistake
            _system_config={"health_check_period_ms": 2000, "health_check_failure_threshold": 5}))
        self.address = self.cluster.address
        self.dashboard_url = "http://" + self.cluster.webui_url if self.cluster.webui_url else None
        for _ in range(n_workers):
            self.add_worker()
        self.cluster.wait_for_nodes()
        self._give_internal_kv_back()

    def add_worker(self, **kw):
        args = dict(num_cpus=self.cpus, object_store_memory=self.object_store, resources={"sim_node": 1})
        args.update(kw)
        node = self.cluster.add_node(**args)
        self._give_internal_kv_back()
        return node

    @staticmethod
    def _give_internal_kv_back() -> None:
        """Every in-process Node points `ray.experimental.internal_kv` at its own GCS; point it back
        at the cluster this process is connected to (`ray_local`), which Ray's driver-side code uses."""
        import ray
        from ray.experimental import internal_kv

        if ray.is_initialized():
            internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)

    @property
    def workers(self) -> dict:
        """{node id (hex): Node} of the live worker nodes."""
        return {n.node_id: n for n in self.cluster.worker_nodes}

    def kill(self, node_id: str) -> None:
        self.cluster.remove_node(self.workers[node_id], allow_graceful=False)

    def replace(self, node_id: str, **kw):
        """Kill `node_id` hard and add a fresh worker node in its place; returns the new node."""
        self.kill(node_id)
        return self.add_worker(**kw)

    def ensure_workers(self, n: int) -> None:
        """At least `n` live worker nodes (tests that killed nodes leave the cluster as they found it)."""
        while len(self.cluster.worker_nodes) < n:
            self.add_worker()
        self.cluster.wait_for_nodes()

    def actors(self, class_name: str | None = None) -> list:
        """Live actors (`ray.util.state` records: .class_name, .node_id, .pid), optionally of one class."""
        from ray.util.state import list_actors

        out = list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000)
        return [a for a in out if class_name is None or a.class_name == class_name]

    def metrics_urls(self) -> list[str]:
        """Every live node's Prometheus endpoint (Ray's metrics agent)."""
        nodes = [self.cluster.head_node, *self.cluster.worker_nodes]
        return [f"http://{n.node_ip_address}:{n.metrics_export_port}/metrics" for n in nodes]

    def env(self, **extra) -> dict:
        """The environment of a job run against this cluster (RAY_ADDRESS set)."""
        return dict(os.environ, RAY_ADDRESS=self.address, **extra)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One simulated cluster per session (head with no CPUs, two 4-CPU worker nodes), shared by every
    multi-node test; each test calls `ensure_workers(n)` first, since an earlier test may have killed
    nodes. See SimCluster."""
    c = SimCluster()
    yield c
    c.shutdown()
