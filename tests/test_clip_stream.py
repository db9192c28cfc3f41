"""OPD's training input through Ray Data (ark_ray/data/clip_stream.py), without the models: the data
order of DataPositions across epochs and a resume, clips that are the manifest's segments, an object
store that stays within the read-ahead window however many batches pass, reload, and eval's first rows."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from ark_ray.audio import load_audio
from ark_ray.config import InputConfig
from ark_ray.data.manifest import read_manifest

REPO = pathlib.Path(__file__).resolve().parents[1]
WINDOW_MB = 2.0


@pytest.fixture(scope="module")
def segments(tmp_path_factory) -> pathlib.Path:
    """120 one-second segments (3 per clip) of the 40 bundled training clips."""
    rows = []
    for r in read_manifest(REPO / "assets/demo_corpus/train_sample.jsonl"):
        for k in range(3):
            rows.append({"id": f"{r['id']}@{k}", "audio": r["audio"], "text": r["text"],
                         "begin_time": 0.05 * k, "end_time": 0.05 * k + 1.0, "language": "en"})
    path = tmp_path_factory.mktemp("clips") / "segments.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _store_mb(ray) -> float:
    """Primary copies in the object store: the objects something still refers to (freed objects
    leave `bytes_used` in batches, a second or so later)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_primary_copy / 2**20


def test_stream_keeps_the_data_order_and_a_flat_object_store(ray_local, segments):
    """A resumed stream (the watermark inside epoch 0, two positions above it consumed) yields exactly
    the pending positions in order, through three epochs, each clip the manifest row DataPositions
    maps it to, cut to its segment; the object store stays within the read-ahead window while ten
    times that much audio passes; reload makes the same clips again."""
    import ray

    from ark_ray.data.clip_stream import ClipStream, DataPositions, StreamOptions, first_rows, reload_clips
    from ark_ray.data.manifest_dataset import open_manifest

    rows = read_manifest(segments)
    manifest = open_manifest(str(segments))
    # one block for a small manifest, not Ray Data's split towards its default parallelism (a task,
    # often a fresh worker process, per block in every later pass)
    assert manifest.dataset.materialize().num_blocks() == 1
    data = DataPositions(manifest.rows, seed=7)
    data.consume(list(range(0, 21)) + [25, 30])                  # low = 21, {25, 30} above it
    expected = data.pending()
    opts = StreamOptions(InputConfig(window_mb=WINDOW_MB, block_rows=4), max_audio_s=30.0)
    stream = ClipStream(manifest, data, batch_size=8, opts=opts)
    base = _store_mb(ray)
    store, passed_mb, kept = [], 0.0, {}
    load = ray.remote(num_cpus=0)(lambda c: c.load())             # as a rollout worker does
    for step in range(48):                                       # 384 positions: into epoch 3
        positions, clips = stream.next_batch()
        assert positions == [next(expected) for _ in range(8)]
        batch = ray.get(load.remote(clips))
        assert batch.positions == positions
        assert batch.ids == [rows[data.row(p)]["id"] for p in positions]
        assert batch.texts == [rows[data.row(p)]["text"] for p in positions]
        assert batch.columns["language"] == ["en"] * 8
        if step in (0, 40):
            r = rows[data.row(positions[3])]
            want = load_audio(r["audio"], begin_time=r["begin_time"], end_time=r["end_time"])
            assert np.array_equal(batch.waves[3], want)
        if step in (3, 30):
            kept[positions[5]] = batch.waves[5].copy()
        passed_mb += sum(w.nbytes for w in batch.waves) / 2**20
        del clips, batch
        assert len(stream._blocks) <= 1                            # the driver holds at most one block ahead
        store.append(_store_mb(ray) - base)
    assert positions[-1] >= 2 * data.n                             # three epochs went by
    assert stream.pipelines == 1                                   # a small manifest: one pipeline, many epochs
    # the store holds the window (plus a block per stage in flight), not the audio that went by
    assert passed_mb > 10 * WINDOW_MB
    assert max(store[10:]) < WINDOW_MB + 4, store
    again = reload_clips(manifest, data, list(kept), opts).load()
    assert again.positions == list(kept)
    assert all(np.array_equal(w, kept[p]) for p, w in zip(again.positions, again.waves))
    stream.close()
    evals = [c.load() for c in first_rows(manifest, 10, opts)]
    assert [i for b in evals for i in b.ids] == [r["id"] for r in rows[:10]]
