"""A training run's checkpoints in its run folder (local, s3:// or any pyarrow filesystem), crash-safe.

    <output_dir>/checkpoints/step_<N>/deepspeed/...      every learner rank's DeepSpeed files, each
                                                         uploaded by its own rank from its node
    <output_dir>/checkpoints/step_<N>/zero_to_fp32.py    DeepSpeed's own tools (rank 0)
    <output_dir>/checkpoints/step_<N>/<job>_state.json   the driver's state (step, data positions, ...)
    <output_dir>/checkpoints/latest                      the text `step_<N>`, written LAST

Why a pointer written last: an object store has no atomic folder rename, and a checkpoint is many
files written from many nodes. A crash (a node, the driver, the network) before the pointer is
written leaves a partial `step_<N>` that nothing reads; `latest` still names the previous complete
checkpoint, which `--resume` uses; the next save clears the partial folder first. Only after a
commit are old checkpoints deleted, keeping the newest `keep` (`latest` among them). Ranks stage
their files in a temp folder of their own node (TMPDIR) and delete it after the upload; a resume
downloads to a fresh temp folder on each rank's node, so a brand-new cluster (other nodes, other
disks) continues where the run stopped.
"""
from __future__ import annotations

import re
from typing import Optional

from ark_ray.data.run_storage import RunStorage

ROOT = "checkpoints"
POINTER = f"{ROOT}/latest"
#: DeepSpeed's checkpoint tag: the sub-folder of step_<N> holding the engine's files
TAG = "deepspeed"
_STEP = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (the pointer names a folder that is not there)."""


class Checkpoints:
    """The checkpoints of the run in `storage`; `keep` (>= 1): how many complete ones to keep."""

    def __init__(self, storage: RunStorage, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.storage, self.keep = storage, keep

    @staticmethod
    def dir(step: int) -> str:
        """The run-folder path of step `step`'s checkpoint."""
        return f"{ROOT}/step_{int(step)}"

    def begin(self, step: int) -> str:
        """Start writing step `step`'s checkpoint; returns its folder (the ranks upload there, then
        `commit`). First it deletes every folder above `latest`: what interrupted saves left (of
        this step or another), so that every folder at or below `latest` is a complete one."""
        latest = self.latest()
        if latest == step:
            raise CheckpointError(f"step {step} is already the committed checkpoint "
                                  f"{self.storage.uri_of(self.dir(step))}; it is not written twice")
        for s in self.steps():
            if latest is None or s > latest:
                self.storage.delete(self.dir(s))
        self.storage.delete(self.dir(step))
        return self.dir(step)

    def commit(self, step: int, files: dict[str, dict]) -> str:
        """Write the driver's JSON `files` into step `step`'s folder, then the `latest` pointer,
        then delete checkpoints beyond the newest `keep`; returns the checkpoint's URI."""
        for name, obj in files.items():
            self.storage.write_json(f"{self.dir(step)}/{name}", obj)
        self.storage.write_text(POINTER, f"step_{int(step)}\n")
        self.prune()
        return self.storage.uri_of(self.dir(step))

    def latest(self) -> Optional[int]:
        """The step `latest` names (None: no complete checkpoint yet)."""
        if not self.storage.exists(POINTER):
            return None
        name = self.storage.read_text(POINTER).strip()
        m = _STEP.match(name)
        if not m:
            raise CheckpointError(f"{self.storage.uri_of(POINTER)} holds {name!r}, not step_<N>")
        if not self.storage.exists(f"{ROOT}/{name}"):
            raise CheckpointError(f"{self.storage.uri_of(POINTER)} names {name}, but "
                                  f"{self.storage.uri_of(f'{ROOT}/{name}')} is not there")
        return int(m.group(1))

    def steps(self) -> list[int]:
        """Steps with a folder under checkpoints/ (complete or not), ascending."""
        found = [_STEP.match(n) for n, is_dir in self.storage.list_dir(ROOT).items() if is_dir]
        return sorted(int(m.group(1)) for m in found if m)

    def read_json(self, step: int, name: str) -> dict:
        return self.storage.read_json(f"{self.dir(step)}/{name}")

    def prune(self) -> list[int]:
        """Delete the complete checkpoints (at or below `latest`: `begin` keeps partial ones above
        it) other than the newest `keep`; the steps deleted."""
        latest = self.latest()
        if latest is None:
            return []
        complete = [s for s in self.steps() if s <= latest]
        gone = complete[:-self.keep]
        for s in gone:
            self.storage.delete(self.dir(s))
        return gone
