"""How OPD's actor roles come back after a node is lost: which actors are free, busy or coming back.

Rollout workers and teacher scorers are Ray actors with `max_restarts`: when their node vanishes Ray
starts them again on a node with room (a surviving one, or the replacement the autoscaler adds).
Ray's own retries do not bridge that gap (a call on an actor of a dead node fails with
`ActorUnavailableError` within milliseconds, long before Ray declares the node dead), so the
controller does it: the failed call's batch is redone from its data positions, and the actor is
`lost` here until a probe call answers again. The probe (`engine_info` / `ready`) returns where the
actor now runs, so the recovery line can say what came back where. A probe that fails because the
actor is still unreachable is sent again a second later; one that cannot be answered within
`timeout_s` of the loss, or an actor Ray will not restart (no restarts left), ends the run with
`RecoveryFailed`, one line that names the lost node and role and how to `--resume`.

A rollout worker that answers again is not given work at once: it holds the initial weights, so it
is held until the controller's next weight sync has reached it (`release`).

Calls carry the actor's incarnation (`epoch`, one more after each loss): a call sent before a loss
that fails after the actor came back redoes its work but does not mark the actor lost again.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import ray

from ark_ray.faults import RecoveryFailed, gone_for_good, is_lost, short

FREE, BUSY, LOST, HELD = "free", "busy", "lost", "held"


@dataclass
class Loss:
    """One lost actor, from the first failed call to its comeback."""
    role: str
    index: int
    node: Optional[str]            # where it ran when it was lost
    pid: Optional[int]
    error: str
    t0: float
    redone: int = 0                # batches redone because of it
    probe: Optional[ray.ObjectRef] = None
    retry_at: float = 0.0          # a failed probe is sent again from then on


@dataclass
class Comeback:
    """A lost actor that answers again: where it runs now and what it cost."""
    role: str
    index: int
    lost_node: Optional[str]
    node: Optional[str]
    restarted: bool                # a new process (Ray restarted it), not only a call that failed
    error: str
    redone: int
    seconds: float

    def record(self) -> dict:
        """The recovery record (metrics.jsonl, `recovery_line`)."""
        return dict(role=self.role, index=self.index, lost_node=self.lost_node, node=self.node,
                    restarted=self.restarted, error=self.error, batches_redone=self.redone, seconds=self.seconds)


def _node(node: Optional[str]) -> str:
    return node[:12] if node else "?"


def recovery_line(rec: dict) -> str:
    """The console's one line for a recovery record."""
    head = f"recovered {rec['role']} {rec['index']} in {rec['seconds']:.1f} s: lost with node {_node(rec['lost_node'])}"
    head += f" ({rec['error'].split(':')[0]})"
    if rec["role"] == "learner rank":
        return (f"{head}; the learner group restarted on node {_node(rec['node'])} from "
                + (f"the checkpoint of step {rec['from_step']}" if rec["from_step"] else "the start")
                + f" ({rec['steps_redone']} step(s) to redo), weights v{rec['weights_version']} sent to the "
                f"rollout workers; restart {rec['failures']} of max_failures={rec['max_failures']}")
    where = (f"restarted on node {_node(rec['node'])}" if rec["restarted"]
             else f"reachable again on node {_node(rec['node'])}")
    redone = rec.get("batches_redone", 0)
    tail = f", {redone} batch{'es' if redone != 1 else ''} redone"
    if rec.get("weights_version") is not None:
        tail += f", weights v{rec['weights_version']} loaded"
    return f"{head}; {where}{tail}"


class RolePool:
    """The actors of one role and their state: free, busy (one call at a time), lost (a probe is out)
    or held (answered again, waiting for the controller to release it)."""

    def __init__(self, role: str, actors: list, probe: Callable, timeout_s: float, resume_hint: Callable[[], str],
                 places: Optional[list[dict]] = None):
        """`probe(actor)`: a cheap call that returns where the actor runs ({node, pid, ...});
        `resume_hint()`: how to go on, for the error line when recovery is impossible."""
        self.role, self.actors, self.probe_call = role, actors, probe
        self.timeout_s, self.resume_hint = timeout_s, resume_hint
        self.state = [FREE] * len(actors)
        self.epoch = [0] * len(actors)
        self.free: deque = deque(range(len(actors)))
        self.places: list[dict] = list(places) if places else [{} for _ in actors]
        self.losses: dict[int, Loss] = {}
        self._ids = {a._actor_id.hex(): i for i, a in enumerate(actors)}

    def name(self, i: int) -> str:
        return f"{self.role} {i}"

    def index_of(self, actor_id: Optional[str]) -> Optional[int]:
        return self._ids.get(actor_id) if actor_id else None

    # ------------------------------------------------------------------ work
    def take(self) -> Optional[int]:
        """A free actor, now busy; None when none is free."""
        while self.free:
            i = self.free.popleft()
            if self.state[i] == FREE:
                self.state[i] = BUSY
                return i
        return None

    def give(self, i: int) -> None:
        """Actor `i` finished its call: free again, unless it was lost meanwhile."""
        if self.state[i] == BUSY:
            self.state[i] = FREE
            self.free.append(i)

    def release(self, i: int) -> None:
        """Held actor `i` (back after a loss) may serve again."""
        if self.state[i] == HELD:
            self.state[i] = FREE
            self.free.append(i)

    def up(self) -> list[int]:
        """Actors that answer calls now (free or busy)."""
        return [i for i, s in enumerate(self.state) if s in (FREE, BUSY)]

    # ------------------------------------------------------------------ losses
    def lost(self, i: int, error: BaseException, epoch: int, redone: int = 0) -> bool:
        """A call sent to actor `i` in its incarnation `epoch` failed because the actor (or its node)
        was lost: probe until it answers. True for a new loss; a call of an older incarnation only
        counts its redone work."""
        if self.state[i] == LOST or epoch != self.epoch[i]:
            if i in self.losses:
                self.losses[i].redone += redone
            return False
        place = self.places[i]
        self.state[i] = LOST
        self.epoch[i] += 1
        self.losses[i] = Loss(self.role, i, place.get("node"), place.get("pid"), short(error), time.monotonic(),
                              redone=redone)
        self._send_probe(i)
        return True

    def _send_probe(self, i: int) -> None:
        self.losses[i].probe = self.probe_call(self.actors[i])
        self.losses[i].retry_at = 0.0

    def probes(self) -> list:
        """The probe calls in flight (the controller waits on them with its other calls)."""
        return [loss.probe for loss in self.losses.values() if loss.probe is not None]

    def poll(self) -> list[tuple[int, dict, Comeback]]:
        """Actors whose probe answered: (index, where it runs now, the comeback), each now held.
        Raises RecoveryFailed past `timeout_s`."""
        now = time.monotonic()
        back = []
        for i, loss in list(self.losses.items()):
            if now - loss.t0 > self.timeout_s:
                raise RecoveryFailed(self._fail_line(
                    i, f"the cluster had no room to restart it within recovery_timeout_s={self.timeout_s:g} s"))
            if loss.probe is None:
                if now >= loss.retry_at:
                    self._send_probe(i)
                continue
            done, _ = ray.wait([loss.probe], timeout=0)
            if done:
                try:
                    place = ray.get(done[0])
                except Exception as e:  # noqa: BLE001 - still unreachable, or its own error
                    if not is_lost(e):
                        raise
                    if gone_for_good(e):
                        raise RecoveryFailed(self._fail_line(i, f"Ray will not restart it ({short(e, 100)}); "
                                                                "raise max_actor_restarts")) from None
                    loss.probe, loss.retry_at = None, now + 1.0
                    continue
                del self.losses[i]
                self.places[i] = place
                self.state[i] = HELD
                back.append((i, place, Comeback(
                    self.role, i, loss.node, place.get("node"),
                    restarted=(place.get("pid"), place.get("node")) != (loss.pid, loss.node),
                    error=loss.error, redone=loss.redone, seconds=now - loss.t0)))
        return back

    def _fail_line(self, i: int, why: str) -> str:
        node = self.losses[i].node if i in self.losses else self.places[i].get("node")
        return f"lost node {_node(node)} ({self.name(i)}) and {why}; {self.resume_hint()}"


__all__ = ["RolePool", "Loss", "Comeback", "recovery_line", "FREE", "BUSY", "LOST", "HELD"]
