"""Telling a lost node from the code's own error (ark_ray/faults.py), and the recovery lines users read
(ark_ray/opd/recovery.py). No Ray cluster: Ray's exception classes are built directly."""
from ray.exceptions import (ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError,
                            RayTaskError)

from ark_ray.faults import LearnerLost, gone_for_good, is_lost, lost_actor_id, short
from ark_ray.opd.recovery import recovery_line

ACTOR = b"\x01" * 16


def wrapped(cause: Exception) -> Exception:
    """What a caller gets when the task raised `cause` (or failed on a lost argument)."""
    return RayTaskError("score", "Traceback ...", cause).as_instanceof_cause()


def test_a_lost_actor_object_or_node_is_a_loss_and_the_codes_own_error_is_not():
    unavailable = ActorUnavailableError("The actor is restarting", ACTOR)
    assert is_lost(unavailable) and lost_actor_id(unavailable) == ACTOR.hex() and not gone_for_good(unavailable)
    assert is_lost(wrapped(unavailable)) and lost_actor_id(wrapped(unavailable)) == ACTOR.hex()
    lost_object = ObjectLostError("0" * 56, None, "")
    assert is_lost(lost_object) and lost_actor_id(lost_object) is None
    assert is_lost(OwnerDiedError("0" * 56, None, ""))
    assert is_lost(ActorDiedError()) and gone_for_good(ActorDiedError())        # no restarts left
    constructor = RayTaskError("__init__", "tb", ValueError("bad dir"), actor_id=ACTOR.hex())
    init_failed = ActorDiedError(constructor)                                    # its constructor raised
    assert not is_lost(init_failed) and not gone_for_good(init_failed)
    assert not is_lost(wrapped(ValueError("disk full"))) and not is_lost(ValueError("x"))
    assert short(wrapped(unavailable)).startswith("ActorUnavailableError")
    assert len(short(ValueError("x" * 500))) == 160
    lost = LearnerLost(1, "f595f1b2e62fabcdef", unavailable)
    assert (lost.role, lost.index) == ("learner rank", 1) and "node f595f1b2e62f" in str(lost)


def test_recovery_lines_say_what_was_lost_what_restarted_and_how_long_it_took():
    rollout = dict(role="rollout worker", index=0, lost_node="5c96015c8053aaaa", node="d8e7a4019227bbbb",
                   restarted=True, error="ActorUnavailableError: The actor ...", batches_redone=2, seconds=21.1,
                   weights_version=4)
    assert recovery_line(rollout) == (
        "recovered rollout worker 0 in 21.1 s: lost with node 5c96015c8053 (ActorUnavailableError); restarted on "
        "node d8e7a4019227, 2 batches redone, weights v4 loaded")
    teacher = dict(rollout, role="teacher", restarted=False, batches_redone=1, weights_version=None)
    assert recovery_line(teacher).endswith("reachable again on node d8e7a4019227, 1 batch redone")
    learner = dict(role="learner rank", index=0, lost_node="f595f1b2e62f0000", node="45672db6b64d0000",
                   restarted=True, error="ActorUnavailableError: ...", seconds=20.6, from_step=6, steps_redone=1,
                   weights_version=9, failures=1, max_failures=2)
    assert recovery_line(learner) == (
        "recovered learner rank 0 in 20.6 s: lost with node f595f1b2e62f (ActorUnavailableError); the learner "
        "group restarted on node 45672db6b64d from the checkpoint of step 6 (1 step(s) to redo), weights v9 sent "
        "to the rollout workers; restart 1 of max_failures=2")
