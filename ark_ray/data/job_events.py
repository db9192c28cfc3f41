"""What a batch job's console reports while Ray Data runs it: engines ready, nodes lost and joined.

Why its own channel: Ray Data runs the engines and tasks on its own and tells the driver nothing
but results, while a user wants a line when an engine is up (and how long it took to build) and
when a node dies and its work is redone. Workers `publish` small records into Ray's GCS key-value
store (it lives on the head node, so it outlasts any worker node); `ClusterWatch`, a thread of
the driver, reads them and watches the cluster's node list, turning both into console lines and
the counts of the closing table.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Callable, Optional

NAMESPACE = b"ark_ray"


def _gcs():
    """The GCS client of the cluster this process is connected to.

    Not `ray.experimental.internal_kv`: its client is a process global that every in-process
    `ray._private.node.Node` re-points at its own GCS (a `ray.cluster_utils.Cluster` next to the
    driver's cluster, as in the tests), after which a driver would read another cluster's records
    while its workers publish to its own."""
    import ray

    return ray._private.worker.global_worker.gcs_client


def new_channel(prefix: str = "batch") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def publish(channel: str, kind: str, record: dict) -> None:
    """From any Ray worker: a record of `kind` on `channel`, stamped with node, pid and time.
    Best effort: a job's results never depend on it."""
    try:
        import ray

        rec = dict(record, kind=kind, node=ray.get_runtime_context().get_node_id(), pid=os.getpid(), t=time.time())
        _gcs().internal_kv_put(f"{channel}/{kind}/{uuid.uuid4().hex}".encode(), json.dumps(rec).encode(), True,
                               NAMESPACE)
    except Exception:  # noqa: BLE001 - no Ray, no GCS: nothing to report to
        pass


def read_new(channel: str, seen: set) -> list[dict]:
    """Records on `channel` not in `seen` (their keys are added to it), oldest first."""
    gcs = _gcs()
    out = []
    for key in gcs.internal_kv_keys((channel + "/").encode(), NAMESPACE) or []:
        if key in seen:
            continue
        raw = gcs.internal_kv_get(key, NAMESPACE)
        seen.add(key)
        if raw:
            out.append(json.loads(raw))
    return sorted(out, key=lambda r: r.get("t", 0))


def clear(channel: str) -> None:
    try:
        _gcs().internal_kv_del((channel + "/").encode(), True, NAMESPACE)
    except Exception:  # noqa: BLE001 - Ray already gone
        pass


def _alive_nodes() -> dict:
    import ray

    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def _node_name(node: dict | str) -> str:
    if isinstance(node, str):
        return node[:8]
    return f"{node['NodeID'][:8]} ({node.get('NodeManagerAddress', '?')})"


class ClusterWatch:
    """Driver thread: a console line per engine ready, node lost and node joined, every `period_s`.

    `summary()` gives the counts (nodes lost, engines started, engine builds) for the closing
    table; `stop()` reads what is left once more, so no event of the run goes unreported."""

    def __init__(self, channel: str, on_line: Callable[[str], None], period_s: float = 2.0, t0: Optional[float] = None):
        self.channel, self.on_line, self.period_s = channel, on_line, period_s
        self.t0 = time.time() if t0 is None else t0
        self.seen: set = set()
        self.nodes = _alive_nodes()
        self.lost: list[str] = []
        self.joined: list[str] = []
        self.engines: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.poll()

    def poll(self) -> bool:
        """Report what changed since the last poll; False when the GCS could not be read (a hiccup:
        the next period tries again). Nodes and records are read apart, so a failed node query
        never holds back the engines' records (the closing table counts them)."""
        ok = True
        try:
            records = read_new(self.channel, self.seen)
        except Exception:  # noqa: BLE001
            records, ok = [], False
        try:
            nodes = _alive_nodes()
        except Exception:  # noqa: BLE001
            nodes, ok = self.nodes, False
        for nid in set(self.nodes) - set(nodes):
            self.lost.append(nid)
            self.on_line(f"node {_node_name(self.nodes[nid])} lost: Ray Data reruns its tasks and restarts "
                         "its engines on the nodes left")
        for nid in set(nodes) - set(self.nodes):
            self.joined.append(nid)
            cpus = nodes[nid].get("Resources", {}).get("CPU", 0)
            gpus = nodes[nid].get("Resources", {}).get("GPU", 0)
            self.on_line(f"node {_node_name(nodes[nid])} joined ({cpus:g} CPUs" + (f", {gpus:g} GPUs)" if gpus else ")"))
        self.nodes = nodes
        for r in records:
            if r.get("kind") != "engine":
                continue
            self.engines.append(r)
            after = f", after the loss of node {_node_name(self.lost[-1])}" if self.lost else ""
            self.on_line(f"engine {len(self.engines)} ready on node {_node_name(r['node'])} at "
                         f"{r['t'] - self.t0:.0f} s (built in {r['build_s']:.1f} s{after})")
        return ok

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for _ in range(5):   # the last read feeds the closing table: retry a GCS hiccup
            if self.poll():
                break
            time.sleep(1.0)
        clear(self.channel)

    def summary(self) -> dict:
        return {"nodes_lost": len(self.lost), "nodes_joined": len(self.joined), "engines_started": len(self.engines),
                "engine_build_s": [r["build_s"] for r in self.engines],
                "engines_ready_s": [round(r["t"] - self.t0, 2) for r in self.engines]}
