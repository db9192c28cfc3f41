"""SFT's input: the run's data positions as one Ray Data dataset per learner rank.

Data order. Step s (1-based) trains the positions [(s - 1) * B, s * B) of batch size B; position p
is row perm_e[p mod N] of epoch e = p // N, where perm_e = permutation(seed + e) of the manifest's N
good rows (numpy's default_rng, the order OPD's DataPositions use). Rank r of `world` takes the
step's rows j = r, r + world, ... (as `LearnerGroup.split_batch` does), so a run trains the same
batches on any number of ranks, and a resumed or restarted run goes on with exactly the rows an
uninterrupted one would.

Pipeline of one rank (Ray Data: every stage may run on any node; the driver holds N and the seed,
never a row list):

    the manifest's good rows (data/manifest_dataset.py, each with its index `_row`)
      -> each row to its positions in [start, end) that fall to this rank (one per epoch)
      -> sort by position: an all-to-all over the rows' metadata only (paths, texts, ids)
      -> featurize_rows (data/featurize.py): decode, resample, log-mel; a bad clip is an error row
      -> the rank's DataIterator, `ray.train.get_dataset_shard("train")`

Restarts. Ray Train builds the datasets again at every start of the worker group (after a lost
rank, `FailureConfig`); `SftInput` is both that dataset factory (`datasets={"train": input}`) and a
`UserCallback` that sees every checkpoint the controller registers. Both run in the Ray Train
controller and the trainer ships them there in one pickle, so they are one object: a restarted
group's datasets begin right after the checkpoint it restores (no audio decoded again for steps
already trained). Correctness does not rest on that: `step_batches` checks every batch's positions
against the step it expects and passes over steps the restored checkpoint already holds.
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import numpy as np

from ark_ray.data.featurize import featurize_rows

from ray.train import DataConfig
from ray.train.v2.api.callback import UserCallback   # Ray Train's controller-side callbacks (Train V2)

#: Columns of a manifest row the learner needs (plus the text field).
KEEP = ("audio", "begin_time", "end_time", "id")
POS = "_pos"


@functools.lru_cache(maxsize=4)
def _inverse_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """where[row] = the row's index in epoch `epoch`'s order."""
    perm = np.random.default_rng(seed + epoch).permutation(n_rows)
    where = np.empty(n_rows, np.int64)
    where[perm] = np.arange(n_rows)
    return where


def row_at(position: int, n_rows: int, seed: int) -> int:
    """The manifest row (index among the good rows) at a data position."""
    epoch, k = divmod(int(position), n_rows)
    return int(np.random.default_rng(seed + epoch).permutation(n_rows)[k])


def positions_of(rows: np.ndarray, n_rows: int, seed: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """(index into `rows`, position) of every position in [start, end) that holds one of `rows`
    (a row index among the manifest's good rows), one per epoch the range touches."""
    rows = np.asarray(rows, np.int64)
    idx, pos = [], []
    for epoch in range(start // n_rows, (end - 1) // n_rows + 1 if end > start else 0):
        p = epoch * n_rows + _inverse_permutation(n_rows, seed, epoch)[rows]
        keep = (p >= start) & (p < end)
        idx.append(np.nonzero(keep)[0])
        pos.append(p[keep])
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(idx), np.concatenate(pos)


def rank_of(positions: np.ndarray, batch_size: int, world: int) -> np.ndarray:
    """The rank that trains each position: its index j in its step's batch, mod world."""
    return (np.asarray(positions, np.int64) % batch_size) % world


def rows_per_step(batch_size: int, rank: int, world: int) -> int:
    return len(range(rank, batch_size, world))


def _to_positions(batch, n_rows: int, seed: int, start: int, end: int, row_col: str):
    """map_batches fn (pyarrow): each row once per position of it in [start, end)."""
    import pyarrow as pa

    idx, pos = positions_of(batch[row_col].to_numpy(), n_rows, seed, start, end)
    return batch.take(pa.array(idx, pa.int64())).append_column(POS, pa.array(pos, pa.int64()))


def _of_rank(batch, batch_size: int, world: int, rank: int):
    """map_batches fn (pyarrow): the rows that fall to `rank`."""
    import pyarrow as pa

    keep = rank_of(batch[POS].to_numpy(), batch_size, world) == rank
    return batch.filter(pa.array(keep))


class SftInput(UserCallback):
    """The training data of one SFT run: Ray Train's dataset factory and a controller callback.

    `rows` is the lazy dataset of the manifest's `n_rows` good rows (`open_manifest(...).dataset`);
    `start_step` is the step the next worker group starts after (0, or the checkpoint `--resume`
    continues from); the controller moves it on with every registered checkpoint.
    """

    def __init__(self, rows, n_rows: int, *, seed: int, batch_size: int, steps: int, text_field: str,
                 max_audio_s: Optional[float], featurize_workers: int, start_step: int = 0,
                 row_col: str = "_row"):
        self.rows, self.n_rows, self.seed = rows, n_rows, seed
        self.batch_size, self.steps, self.text_field = batch_size, steps, text_field
        self.max_audio_s, self.featurize_workers = max_audio_s, featurize_workers
        self.start_step, self.row_col = start_step, row_col
        self.builds: list[int] = []    # start steps of the datasets built (what the controller saw)

    # ------------------------------------------------------------------ Ray Train's hooks (controller)
    def __call__(self):
        """The dataset Ray Train hands to `RankShards` at a worker-group start: every position of
        steps start_step + 1 .. steps with its manifest row (lazy; the ranks' pipelines run it)."""
        self.builds.append(self.start_step)
        return self.positions(self.start_step)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None and metrics and "data_step" in metrics[0]:
            self.start_step = int(metrics[0]["data_step"])

    # ------------------------------------------------------------------ the datasets
    def positions(self, start_step: int):
        """The manifest rows at the positions of steps start_step + 1 .. steps, with `_pos`
        (unordered: `shard` sorts each rank's part)."""
        keep = list(dict.fromkeys([*KEEP, self.text_field, self.row_col]))
        return self.rows.select_columns(keep).map_batches(
            _to_positions, batch_format="pyarrow", batch_size=None,
            fn_kwargs=dict(n_rows=self.n_rows, seed=self.seed, start=start_step * self.batch_size,
                           end=self.steps * self.batch_size, row_col=self.row_col))

    def data_config(self) -> "RankShards":
        return RankShards(self.batch_size, self.max_audio_s, self.featurize_workers)


def rank_shard(positions, rank: int, world: int, batch_size: int, max_audio_s: Optional[float],
               featurize_workers: int):
    """Rank `rank`'s part of `positions` (`SftInput.positions`), in position order, featurized
    (`mel`, `frames`, `error`, ... as featurize_rows adds them)."""
    mine = positions.map_batches(_of_rank, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs=dict(batch_size=batch_size, world=world, rank=rank))
    return mine.sort(POS).map_batches(
        featurize_rows, fn_kwargs={"max_audio_s": max_audio_s}, batch_format="numpy",
        batch_size=rows_per_step(batch_size, rank, world), concurrency=featurize_workers)


class RankShards(DataConfig):
    """Gives each rank its own `rank_shard` (instead of Ray's streaming split, whose assignment of
    rows to ranks is not a fixed function of the data), executed in position order. Ray Train
    keeps a deep copy of it, so it holds fixed settings only."""

    def __init__(self, batch_size: int, max_audio_s: Optional[float], featurize_workers: int):
        super().__init__()
        self.batch_size, self.max_audio_s, self.featurize_workers = batch_size, max_audio_s, featurize_workers

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict] = [{} for _ in range(world_size)]
        for name, positions in datasets.items():
            for r in range(world_size):
                ds = rank_shard(positions, r, world_size, self.batch_size, self.max_audio_s, self.featurize_workers)
                ds = ds.copy(ds, _deep_copy=True)   # its own DataContext, as DataConfig.configure does
                opts = self._resolve_execution_options(name)
                opts.preserve_order = True       # position order is the data order
                ds.context.execution_options = opts
                out[r][name] = ds.iterator()
        return out


def step_batches(it, rank: int, world: int, batch_size: int, steps: int, after_step: int,
                 prefetch_batches: int = 2) -> Iterator[tuple[int, dict]]:
    """(step, this rank's featurized rows of it) for steps after_step + 1 .. steps, read from the
    rank's DataIterator `it`. Steps at or before `after_step` (a dataset built before the restored
    checkpoint) are passed over; a batch whose positions are not exactly the ones its step gives
    this rank raises (the data order would be broken)."""
    n = rows_per_step(batch_size, rank, world)
    expected = after_step + 1
    for batch in it.iter_batches(batch_size=n, batch_format="numpy", prefetch_batches=prefetch_batches):
        pos = np.asarray(batch[POS], np.int64)
        step = int(pos[0]) // batch_size + 1
        if step <= after_step:
            continue
        want = np.arange((step - 1) * batch_size + rank, step * batch_size, world)
        if step != expected or len(pos) != len(want) or (pos != want).any():
            raise RuntimeError(f"SFT input of rank {rank}: got positions {pos.tolist()} where step {expected} "
                               f"needs {want.tolist()}")
        yield step, batch
        expected += 1
        if step >= steps:
            return
    if expected <= steps:
        raise RuntimeError(f"SFT input of rank {rank} ended before step {expected} of {steps}")
