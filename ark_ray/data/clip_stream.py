"""Training input through Ray Data: data positions in, batches of decoded clips out, by reference.

    DataPositions (driver): positions 0, 1, 2, ... over endless epochs, each epoch its own seeded
    |                       permutation of the manifest's rows; consumed = watermark + set above it
    |  one Ray Data pipeline per epoch (tasks on any node):
    v
    read + check the manifest (open_manifest) -> place: each row's position in this epoch, rows
    already consumed dropped -> sort by position -> blocks of `input.block_rows` -> decode: read, cut
    the segment, downmix, resample to 16 kHz (ark_ray.audio.load_audio)
    |  decoded blocks, as object refs, in position order; Ray Data runs at most `input.window_mb` ahead
    v
    ClipStream.next_batch(): the next B positions and a `ClipRefs` (slices of those blocks)
    |  rollout workers / teachers / the learner fetch the clips themselves (`ClipRefs.load`)
    v  the driver drops the ClipRefs once the learner has trained on the batch: the blocks go

Why: the driver holds positions and object refs only, never audio nor manifest rows, and the
object store holds the in-flight window, not the corpus (the old controller kept every decoded
clip pinned for the whole run). Why a sort per epoch: the epoch's order is a permutation of the
whole manifest, and a distributed sort of the rows' metadata (not their audio) is how Ray Data
puts a dataset in an order without any one process holding it. The driver knows which positions
come next (`DataPositions.pending`, the same rule the pipeline filters by), so it cuts batches
from the blocks' row counts alone; `ClipRefs.load` checks the positions it finds.

`reload(positions)` makes the clips of given positions again (a node lost the only copy);
`first_rows` streams a manifest's first rows (held-out evaluation: a fresh pass each time).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from ark_ray.config import InputConfig, S3Config
from ark_ray.data.manifest import ManifestError
from ark_ray.data.manifest_dataset import ROW_INDEX, Manifest

log = logging.getLogger(__name__)

#: The column of decoded audio in a block: 16 kHz mono float32 samples as bytes.
WAVE = "_wave"
#: The column of data positions in a block (ClipRefs.load checks it against the driver's).
POSITION = "_position"
#: Fewest positions one input pipeline covers (many epochs of a small manifest at once).
MIN_SPAN = 4096
#: Restarts of failed input pipelines before the error stops the run.
MAX_RESTARTS = 3


class ClipError(RuntimeError):
    """A manifest row whose audio cannot be used (missing, unreadable, too long): names the row."""


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Row indices in epoch `epoch`'s order: its own seeded permutation."""
    return np.random.default_rng(seed + epoch).permutation(n)


class DataPositions:
    """Which data positions are consumed (trained on or dropped): a watermark `low` below which all
    are, plus the consumed ones at or above it. Positions run on over epochs without end: position
    p is row `epoch_order(seed, p // n, n)[p % n]`."""

    def __init__(self, n_rows: int, seed: int):
        if n_rows == 0:
            raise ValueError("the training manifest has no rows")
        self.n, self.seed = n_rows, seed
        self.low = 0
        self.above: set[int] = set()
        self.consumed_total = 0   # consume events; equals the consumed count unless a position repeats
        self._perm: dict[int, np.ndarray] = {}

    def consume(self, positions) -> None:
        positions = [int(p) for p in positions]
        self.consumed_total += len(positions)
        self.above.update(p for p in positions if p >= self.low)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1

    def is_consumed(self, p: int) -> bool:
        return p < self.low or p in self.above

    def pending(self) -> Iterator[int]:
        """Unconsumed positions in order, from the watermark on, forever."""
        p = self.low
        while True:
            if p not in self.above:
                yield p
            p += 1

    def row(self, p: int) -> int:
        """The manifest row at position p: epoch p // n, shuffled by its own seed."""
        epoch, k = divmod(p, self.n)
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.pop(min(self._perm))
            self._perm[epoch] = epoch_order(self.seed, epoch, self.n)
        return int(self._perm[epoch][k])

    def state(self) -> dict:
        return {"low": self.low, "above": sorted(self.above), "epoch": self.low // self.n,
                "index_in_epoch": self.low % self.n, "consumed_total": self.consumed_total}

    def consumed(self) -> set[int]:
        return set(range(self.low)) | self.above

    def load(self, st: dict) -> None:
        if "done" in st:   # checkpoints before the watermark: a plain list of consumed positions
            self.low, self.above = 0, set()
            self.consume(st["done"])
        else:
            self.low, self.above = int(st["low"]), set(st["above"])
            self.consumed_total = int(st.get("consumed_total", self.low + len(self.above)))


# ---------------------------------------------------------------------- what workers receive

@dataclasses.dataclass
class ClipBatch:
    """A batch of decoded clips, as a worker sees it after `ClipRefs.load`."""
    positions: list[int]
    ids: list[str]
    texts: list[str]            # "" where the manifest has no transcript
    waves: list[np.ndarray]     # 16 kHz mono float32
    columns: dict               # the manifest's other columns (language, ...), one list each

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class ClipRefs:
    """Where a batch's decoded clips are: (block ref, start row, stop row) slices, in batch order,
    and the data positions they must hold (None: not checked, as for evaluation). Small and
    picklable: it travels in actor calls, and the blocks stay alive while a call holds it."""
    slices: tuple
    positions: Optional[tuple] = None

    def __len__(self) -> int:
        return sum(stop - start for _, start, stop in self.slices)

    def load(self) -> ClipBatch:
        blocks = ray.get([ref for ref, _, _ in self.slices])
        table = pa.concat_tables([b.slice(start, stop - start) for b, (_, start, stop) in zip(blocks, self.slices)],
                                 promote_options="permissive")
        positions = table.column(POSITION).to_pylist() if POSITION in table.column_names else []
        if self.positions is not None and tuple(positions) != tuple(self.positions):
            raise RuntimeError(f"input out of step: the blocks hold positions {positions[:8]}..., the driver "
                               f"expected {list(self.positions[:8])}...")
        waves = [np.frombuffer(w, dtype=np.float32) for w in table.column(WAVE).to_pylist()]
        texts = table.column("text").to_pylist() if "text" in table.column_names else [None] * len(waves)
        skip = {WAVE, POSITION, ROW_INDEX, "id", "text", "audio", "begin_time", "end_time"}
        return ClipBatch(positions=positions, ids=[str(i) for i in table.column("id").to_pylist()],
                         texts=[t if isinstance(t, str) else "" for t in texts], waves=waves,
                         columns={c: table.column(c).to_pylist() for c in table.column_names if c not in skip})


def load_clips(clips) -> ClipBatch:
    """A worker's side of the contract: `clips` is a ClipRefs (or a ClipBatch, passed in-process)."""
    return clips if isinstance(clips, ClipBatch) else clips.load()


# ---------------------------------------------------------------------- the Ray Data stages

def _place(block: pa.Table, n: int, seed: int, start: int, stop: int, skip: np.ndarray) -> pa.Table:
    """Each row at each of its data positions in [start, stop) (one per epoch the span touches),
    the consumed ones (`skip`) left out."""
    rows = block.column(ROW_INDEX).to_numpy()
    parts = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        rank = np.empty(n, dtype=np.int64)
        rank[epoch_order(seed, epoch, n)] = np.arange(n, dtype=np.int64)
        pos = epoch * n + rank[rows]
        keep = (pos >= start) & (pos < stop) & ~np.isin(pos, skip)
        if keep.any():
            idx = np.flatnonzero(keep)
            parts.append(block.take(pa.array(idx)).append_column(POSITION, pa.array(pos[idx], pa.int64())))
    return pa.concat_tables(parts) if parts else block.slice(0, 0).append_column(POSITION, pa.array([], pa.int64()))


def _decode(block: pa.Table, max_audio_s: float, s3_opts: Optional[dict]) -> pa.Table:
    """Read, cut, downmix and resample each row's audio (a ClipError names the row at fault)."""
    from ark_ray.audio import AudioError, load_audio
    from ark_ray.data.s3 import is_s3, read_bytes, split_s3

    fs = None
    waves = []
    for audio, begin, end, rid in zip(*(block.column(c).to_pylist() for c in ("audio", "begin_time", "end_time", "id"))):
        try:
            src = audio
            if is_s3(audio):
                if fs is None:
                    import pyarrow.fs as pafs
                    fs = pafs.S3FileSystem(**(s3_opts or {}))
                src = read_bytes(fs, "/".join(split_s3(audio)))
            wave = load_audio(src, begin_time=begin, end_time=end, max_duration_s=max_audio_s)
        except (AudioError, OSError) as e:
            raise ClipError(f"manifest row {rid} ({audio}): {e}") from None
        waves.append(wave.tobytes())
    return block.append_column(WAVE, pa.array(waves, pa.large_binary()))


@dataclasses.dataclass
class StreamOptions:
    """How the input pipeline runs: the job's InputConfig (window, CPUs, block size), its clip
    length limit and its S3 settings (for s3:// manifests and audio)."""
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    max_audio_s: float = 30.0
    s3: Optional[S3Config] = None


def _finish(ds: "ray.data.Dataset", opts: StreamOptions) -> "ray.data.Dataset":
    """Decode `ds` in blocks of `input.block_rows`, in order, within the window."""
    from ark_ray.data.s3 import s3_options

    s3_opts = s3_options(opts.s3)   # resolved here: workers on other nodes lack the driver's AWS_*
    ds = ds.repartition(target_num_rows_per_block=opts.input.block_rows)
    ds = ds.map_batches(_decode, batch_format="pyarrow", batch_size=opts.input.block_rows, num_cpus=opts.input.num_cpus,
                        fn_kwargs=dict(max_audio_s=opts.max_audio_s, s3_opts=s3_opts))
    ex = ds.context.execution_options
    ex.preserve_order = True
    ex.resource_limits = ex.resource_limits.copy(object_store_memory=int(opts.input.window_mb * 2**20))
    ds.context.enable_progress_bars = False
    return ds


def _bundles(ds: "ray.data.Dataset") -> Iterator[tuple]:
    """(block ref, first row, end row) of `ds`'s output in order, without fetching a block."""
    for bundle in ds.iter_internal_ref_bundles():
        for i, entry in enumerate(bundle.blocks):
            cut = bundle.slices[i] if bundle.slices else None
            start, stop = (cut.start_offset, cut.end_offset) if cut is not None else (0, entry.metadata.num_rows or 0)
            if stop > start:
                yield entry.ref, int(start), int(stop)


# ---------------------------------------------------------------------- the driver's side

class ClipStream:
    """The driver's view of the training input: `next_batch()` -> (positions, ClipRefs).

    Positions come in `DataPositions.pending()` order, from the watermark on, across epochs. One
    Ray Data pipeline covers a span of positions: the rest of an epoch, or at least MIN_SPAN
    positions (many epochs of a small manifest: a pipeline's start-up costs seconds). The stream
    holds refs to the decoded blocks it has not yet cut into batches (at most one block ahead of
    the batches handed out); each ClipRefs keeps its blocks alive until it is dropped.
    """

    def __init__(self, manifest: Manifest, data: DataPositions, batch_size: int, opts: StreamOptions,
                 on_recover: Optional[Callable[[str], None]] = None):
        if manifest.rows != data.n:
            raise ValueError(f"the manifest has {manifest.rows} rows, the data positions count {data.n}")
        self.manifest, self.data, self.batch_size, self.opts = manifest, data, batch_size, opts
        self.on_recover = on_recover or (lambda msg: log.warning("%s", msg))
        self._positions = data.pending()
        self._skip = np.asarray(sorted(data.above), dtype=np.int64)   # consumed before this stream
        self._blocks: deque = deque()       # [ref, end row, first row not yet cut]
        self._source: Optional[Iterator] = None
        self._received: Optional[Iterator[int]] = None   # the current span's positions not yet received
        self._stop = data.low               # end of the current span (the next span starts there)
        self.pipelines = 0                  # Ray Data pipelines started
        self.restarts = 0                   # of them, restarts after a failure

    def _span_dataset(self, start: int, stop: int) -> "ray.data.Dataset":
        skip = self._skip[(self._skip >= start) & (self._skip < stop)]
        ds = self.manifest.dataset.map_batches(
            _place, batch_format="pyarrow", batch_size=None, num_cpus=self.opts.input.num_cpus,
            fn_kwargs=dict(n=self.data.n, seed=self.data.seed, start=start, stop=stop, skip=skip))
        return _finish(ds.sort(POSITION), self.opts)

    def _span_positions(self, start: int, stop: int) -> Iterator[int]:
        skip = set(self._skip[(self._skip >= start) & (self._skip < stop)].tolist())
        return (p for p in range(start, stop) if p not in skip)

    def _start_pipeline(self, start: int, stop: int) -> None:
        self._source = _bundles(self._span_dataset(start, stop))
        self.pipelines += 1

    def _pull(self) -> None:
        """The next decoded block onto `_blocks`. A pipeline that fails for any reason but its data
        (a lost node took a task's inputs or outputs with it: Ray retries tasks, not a lost
        executor's state) starts again from the first position it had not delivered."""
        while True:
            if self._source is None:
                n, start = self.data.n, self._stop
                self._stop = max(start + MIN_SPAN, (start // n + 1) * n)   # the rest of the epoch, or more
                self._received = self._span_positions(start, self._stop)
                self._start_pipeline(start, self._stop)
            try:
                nxt = next(self._source, None)
            except (ClipError, ManifestError) as e:   # the data: one clear error stops the run
                raise type(e)(str(getattr(e, "cause", None) or e)) from None
            except Exception as e:          # noqa: BLE001 - anything else: the pipeline, not the data
                first = next(self._received, None)
                if first is None:           # it had delivered the whole span
                    self._source = None
                    continue
                if self.restarts >= MAX_RESTARTS:
                    raise
                self.restarts += 1
                self.on_recover(f"input: the Ray Data pipeline failed ({type(e).__name__}: {str(e)[:200]}); "
                                f"restarted at position {first} ({self.restarts}/{MAX_RESTARTS})")
                self._received = itertools.chain([first], self._received)
                self._start_pipeline(first, self._stop)
                continue
            if nxt is not None:
                ref, start, stop = nxt
                for _ in range(stop - start):
                    next(self._received)
                self._blocks.append([ref, stop, start])
                return
            self._source = None             # the span is done: the next pipeline takes the next one

    def next_batch(self) -> tuple[list[int], ClipRefs]:
        """The next `batch_size` positions and where their clips are (they may span two epochs)."""
        positions = [next(self._positions) for _ in range(self.batch_size)]
        slices, need = [], self.batch_size
        while need:
            if not self._blocks:
                self._pull()
            blk = self._blocks[0]
            take = min(need, blk[1] - blk[2])
            slices.append((blk[0], blk[2], blk[2] + take))
            blk[2] += take
            need -= take
            if blk[2] == blk[1]:
                self._blocks.popleft()
        return positions, ClipRefs(tuple(slices), tuple(positions))

    def reload(self, positions: Sequence[int]) -> ClipRefs:
        """The clips of `positions` made again (their blocks were lost with a node): one Ray Data
        pass over the manifest that keeps only those rows."""
        return reload_clips(self.manifest, self.data, positions, self.opts)

    def close(self) -> None:
        """Stop the running pipeline (its executor shuts down once its iterator is dropped)."""
        self._source = None
        self._blocks.clear()


def reload_clips(manifest: Manifest, data: DataPositions, positions: Sequence[int], opts: StreamOptions) -> ClipRefs:
    """ClipRefs for exactly `positions` (in that order), decoded afresh."""
    want = np.asarray(list(positions), dtype=np.int64)
    rows = np.asarray([data.row(int(p)) for p in want], dtype=np.int64)
    ds = manifest.dataset.map_batches(_pick, batch_format="pyarrow", batch_size=None, num_cpus=opts.input.num_cpus,
                                      fn_kwargs=dict(rows=rows, positions=want))
    found = ClipRefs(tuple(_bundles(_finish(ds, opts))))
    # the blocks come in manifest order: one small task puts the rows in the order asked for
    table = _reorder.remote(found, [int(p) for p in want])
    return ClipRefs(((table, 0, len(want)),), tuple(int(p) for p in want))


def _pick(block: pa.Table, rows: np.ndarray, positions: np.ndarray) -> pa.Table:
    """The rows at manifest indices `rows` (each tagged with its position; a row asked for twice
    comes twice)."""
    idx = block.column(ROW_INDEX).to_numpy()
    out = []
    for r, p in zip(rows, positions):
        hit = np.flatnonzero(idx == r)
        if len(hit):
            out.append(block.take(pa.array(hit[:1])).append_column(POSITION, pa.array([p], pa.int64())))
    return pa.concat_tables(out) if out else block.slice(0, 0).append_column(POSITION, pa.array([], pa.int64()))


def _head(block: pa.Table, n: int) -> pa.Table:
    return block.filter(pc.less(block.column(ROW_INDEX), n))


@ray.remote(num_cpus=0)
def _reorder(refs: ClipRefs, positions: list) -> pa.Table:
    table = pa.concat_tables([ray.get(ref).slice(start, stop - start) for ref, start, stop in refs.slices],
                             promote_options="permissive")
    at = {p: i for i, p in enumerate(table.column(POSITION).to_pylist())}
    missing = [p for p in positions if p not in at]
    if missing:
        raise RuntimeError(f"reload: positions {missing[:8]} not found in the manifest")
    return table.take(pa.array([at[p] for p in positions]))


def first_rows(manifest: Manifest, n: int, opts: StreamOptions) -> Iterator[ClipRefs]:
    """The decoded clips of the manifest's first `n` good rows, in file order, one ClipRefs per
    decoded block (evaluation: a fresh pass each time, nothing kept)."""
    ds = manifest.dataset
    if n < manifest.rows:
        ds = ds.map_batches(_head, batch_format="pyarrow", batch_size=None, num_cpus=opts.input.num_cpus, fn_kwargs={"n": n})
    for piece in _bundles(_finish(ds, opts)):
        yield ClipRefs((piece,))
