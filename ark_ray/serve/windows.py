"""The audio windows of one request on a model deployment: sent, awaited, and sent again when the
replica that held one is lost.

Why the ingress retries: a window is idempotent (the same audio, the same sampling settings, no
state on the replica), so when its replica vanishes (the node is gone, the actor died, Serve
stopped it past its drain timeout during a rollout) the window can run again on another replica
of the same deployment and the client never sees the loss. Serve's router does not do this for a
request already handed to a replica: the caller gets `ActorDiedError`/`ActorUnavailableError`
(before GCS even declares the node dead), `ReplicaUnavailableError`, or `ObjectLostError` when
the result lived on the lost node. The router learns from that error that the replica is gone, so
the next attempt goes to a live one (or waits in the handle's queue until Serve has started a
replacement). Attempts are bounded (`ServeConfig.window_retries`); each one is logged and counted
(`ark_serve_window_retries_total`), so a recovery is never silent.

A streamed window that restarts starts its token stream over: the consumer drops the tokens it
had for that window (`RESTART`) and goes on; deltas already sent stay valid because the ingress
only ever sends text that extends what it has shown (greedy decoding gives the same tokens).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from ray.exceptions import ObjectLostError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

#: Errors that mean "the replica holding this window is gone", not "the window failed".
LOST_REPLICA = (RayActorError, ReplicaUnavailableError, ObjectLostError)

#: What `WindowCall.next_part` returns when a streamed window starts over on another replica
#: (compared by its key: the ingress's routes are pickled with copies of the globals they use).
RESTART = {"restart": True}

logger = logging.getLogger("ray.serve")


class ReplicaLost(Exception):
    """A window's replica was lost on every attempt."""


@dataclass
class Target:
    """One model deployment behind the ingress: the served model (`stable`) or a canary."""
    role: str
    version: str
    handle: DeploymentHandle

    def __post_init__(self) -> None:
        self.streamer = self.handle.options(stream=True)


class WindowCall:
    """One window in flight; `result()` (unary) or `next_part()` (streamed) resubmits it when its
    replica is lost, at most `retries` times. Submitting may raise Serve's BackPressureError."""

    def __init__(self, target: Target, item: dict, *, stream: bool, retries: int,
                 on_retry: Optional[Callable[["WindowCall", BaseException], None]] = None, label: str = ""):
        self.target, self.item, self.stream, self.retries = target, item, stream, retries
        self.on_retry, self.label = on_retry, label
        self.attempts = 1
        self.call = self._send()

    def _send(self):
        if self.stream:
            return self.target.streamer.stream_window.remote(self.item)
        return self.target.handle.transcribe_window.remote(self.item)

    async def _again(self, err: BaseException) -> None:
        if self.attempts > self.retries:
            raise ReplicaLost(f"the model replica was lost on all {self.attempts} attempts "
                              f"({type(err).__name__})") from err
        logger.warning("ArkIngress: %s of model %s lost with its replica (%s: %s); resubmitted (attempt %d of %d)",
                       self.label or "a window", self.target.version, type(err).__name__,
                       str(err).splitlines()[0][:200] if str(err) else "", self.attempts + 1, self.retries + 1)
        if self.on_retry is not None:
            self.on_retry(self, err)
        await asyncio.sleep(0.1 * self.attempts)   # let the router drop the dead replica first
        self.attempts += 1
        self.call = self._send()

    async def result(self) -> dict:
        while True:
            try:
                return await self.call
            except LOST_REPLICA as e:
                await self._again(e)

    async def next_part(self) -> dict:
        """{"delta": ids}, {"done": result}, or RESTART ({"restart": True}) when the window starts over elsewhere."""
        try:
            return await self.call.__anext__()
        except LOST_REPLICA as e:
            await self._again(e)
            return RESTART

    def cancel(self) -> None:
        """Best effort; a call that already failed re-raises its error on cancel()."""
        try:
            self.call.cancel()
        except Exception:  # noqa: BLE001 - its outcome no longer matters
            pass
