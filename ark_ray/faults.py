"""What a lost node looks like to the code that called into it, and the errors recovery raises.

Why one place: the OPD controller (rollout workers, teacher scorers), the learner group and the
weight sync all have to tell "the actor, the object or the node behind this call is gone" (Ray
restarts the actor, the driver redoes the work) from "the code in the actor raised" (a bug or bad
input: the run fails with that error). Ray reports the first kind as a family of its own
exceptions; a task that failed because an argument of it was lost raises them too. An actor whose
constructor raised is a code error, not a loss, although Ray reports it as `ActorDiedError`.
"""
from __future__ import annotations

from typing import Optional


def lost_types() -> tuple[type, ...]:
    """Ray's exceptions for a lost actor, worker, node or object."""
    from ray import exceptions as rx

    return (rx.RayActorError, rx.ObjectLostError, rx.WorkerCrashedError, rx.NodeDiedError,
            rx.LocalRayletDiedError)


def is_lost(error: BaseException) -> bool:
    """True when `error` says an actor, worker, node or object was lost (the work may be redone),
    False for an error raised by the code itself (including an actor constructor's)."""
    from ray.exceptions import RayActorError

    if not isinstance(error, lost_types()):
        return False
    return not (isinstance(error, RayActorError) and error.actor_init_failed)


def gone_for_good(error: BaseException) -> bool:
    """True when Ray will not restart the actor (it died with no restarts left, or was killed)."""
    from ray.exceptions import ActorDiedError

    return isinstance(error, ActorDiedError) and not error.actor_init_failed


def lost_actor_id(error: BaseException) -> Optional[str]:
    """The hex id of the actor a lost-actor error names (None for lost objects and nodes)."""
    from ray.exceptions import RayActorError

    return getattr(error, "actor_id", None) if isinstance(error, RayActorError) else None


def short(error: BaseException, limit: int = 160) -> str:
    """An error's first line, cut to `limit` characters (console lines and metrics records)."""
    text = str(error).strip().splitlines()
    name = type(error).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):   # Ray's wrapper around the cause's class
        name = name[len("RayTaskError("):-1]
    first = text[0] if text else name
    first = f"{name}: {first}" if name not in first else first
    return first if len(first) <= limit else first[:limit - 3] + "..."


class RoleLost(RuntimeError):
    """An actor of a role (a learner rank, a rollout worker, a teacher scorer) was lost with its node."""

    def __init__(self, role: str, index: int, node: Optional[str], error: BaseException):
        self.role, self.index, self.node, self.error = role, index, node, error
        where = f"node {node[:12]}" if node else "an unknown node"
        super().__init__(f"{role} {index} lost with {where}: {short(error)}")


class LearnerLost(RoleLost):
    """A learner rank was lost: the group restarts from the last checkpoint (OPD's max_failures)."""

    def __init__(self, rank: int, node: Optional[str], error: BaseException):
        super().__init__("learner rank", rank, node, error)


class RecoveryFailed(RuntimeError):
    """Recovery is impossible (no capacity in time, failures used up): one line for the user, naming
    the lost node and role and how to go on (`--resume`)."""


__all__ = ["lost_types", "is_lost", "gone_for_good", "lost_actor_id", "short", "RoleLost", "LearnerLost",
           "RecoveryFailed"]
