"""The batching engine of `sana serve` (sana/server/engine.py) on the shipped 256 px model, 2-4 steps."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sana.errors import UserError
from sana.pipeline import SanaPipeline
from sana.pretrained import shipped_model
from sana.server.engine import BatchKey, Engine, ImageSpec, QueueFull, ShuttingDown

KEY = BatchKey(height=256, width=256, steps=2, sampler="dpm", guidance_scale=2.5, pag_scale=0.0)
OTHER = BatchKey(height=256, width=256, steps=3, sampler="dpm", guidance_scale=2.5, pag_scale=0.0)
TIMEOUT = 60


@pytest.fixture(scope="module")
def pipe():
    if shipped_model() is None:
        pytest.skip("this build ships no model")
    return SanaPipeline.from_pretrained(shipped_model())


class Recorder:
    """Wraps the pipeline: records each call's prompts and the step indexes the sampler reached; can hold a
    call at its start (`hold`) or after a given step (`pause_at`), and fail a call (`fail`)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[dict] = []
        self.steps_seen: list[list[int]] = []
        self.hold = False
        self.pause_at: int | None = None
        self.entered = threading.Event()  # a call is held at its start / paused at its step
        self.go = threading.Event()
        self.fail: BaseException | None = None

    def __call__(self, prompts, *, callback, **kw):
        self.calls.append({"prompts": list(prompts), **kw})
        seen: list[int] = []
        self.steps_seen.append(seen)
        if self.hold:
            self.hold = False
            self.entered.set()
            assert self.go.wait(TIMEOUT)
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error

        def cb(info):
            seen.append(info.index)
            out = callback(info)
            if info.index == self.pause_at:
                self.pause_at = None
                self.entered.set()
                assert self.go.wait(TIMEOUT)
            return out

        return self.pipe(prompts, callback=cb, **kw)


def make_engine(pipe, **kw):
    sizes: list[int] = []
    engine = Engine(pipe, on_batch=lambda n, s: sizes.append(n), **kw)
    return engine, sizes


def specs(*prompts, seed=0, negative=""):
    return [ImageSpec(p, negative, seed + i) for i, p in enumerate(prompts)]


def wait(job):
    asyncio.run(asyncio.wait_for(job.wait(), TIMEOUT))


def events(job):
    async def collect():
        return [e async for e in job.events()]

    return asyncio.run(asyncio.wait_for(collect(), TIMEOUT))


def decoded(engine, name):
    data, media_type = engine.image(name)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16), media_type


def alone(pipe, spec, key):
    (image,) = pipe(
        spec.prompt,
        negative_prompt=spec.negative_prompt,
        seed=[spec.seed],
        **key.settings(),
    )
    return np.asarray(image, dtype=np.int16)


def assert_same(a, b):
    diff = np.abs(a - b)
    assert diff.shape == b.shape
    assert (diff <= 2).mean() >= 0.999, f"max diff {diff.max()}, share > 2: {(diff > 2).mean():.4f}"


# ------------------------------------------------------------------------------------------------- batching


def test_jobs_queued_while_busy_share_a_batch_and_equal_images_made_alone(pipe):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec)
    rec.hold = True
    first = engine.submit(KEY, specs("a blue square"))
    engine.start()
    assert rec.entered.wait(TIMEOUT)  # the worker is busy with `first`
    jobs = [
        engine.submit(KEY, specs("a red circle", seed=3, negative="blurry")),
        engine.submit(KEY, specs("a green triangle", "a yellow star", seed=10)),
        engine.submit(KEY, specs("two blue circles", seed=7, negative="red")),
    ]
    assert engine.queue_depth == 4
    rec.go.set()
    for job in [first, *jobs]:
        wait(job)
    engine.stop()
    assert sizes == [1, 4]
    assert all(job.status == "done" for job in jobs)
    assert rec.calls[1]["seed"] == [3, 10, 11, 7]
    assert rec.calls[1]["negative_prompt"] == ["blurry", "", "", "red"]
    arrays = []
    for job in jobs:
        assert len(job.image_names) == len(job.images)
        for spec, name in zip(job.images, job.image_names, strict=True):
            got, media_type = decoded(engine, name)
            assert media_type == "image/png"
            assert_same(got, alone(pipe, spec, KEY))
            arrays.append(got)
    # Not trivially equal: the images of one batch differ from each other.
    assert np.abs(arrays[1] - arrays[2]).mean() > 1


def test_keys_never_share_a_batch_max_batch_and_fifo(pipe):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec, max_batch=3)
    a = engine.submit(KEY, specs("a"))
    b = engine.submit(OTHER, specs("b"))
    c = engine.submit(KEY, specs("c1", "c2", "c3"))
    d = engine.submit(KEY, specs("d"))
    e = engine.submit(OTHER, specs("e1", "e2"))
    f = engine.submit(OTHER, specs("f"))
    assert [j.position for j in (a, b, c, d, e, f)] == [0, 1, 2, 5, 6, 8]
    engine.start()
    engine.stop(drain=True, timeout=TIMEOUT)
    assert all(j.status == "done" for j in (a, b, c, d, e, f))
    # a cannot take c (3 > room 2), and d never overtakes c; b takes e past the other key's jobs; c fills a
    # batch alone; f never joins d (another key).
    assert [call["prompts"] for call in rec.calls] == [["a"], ["b", "e1", "e2"], ["c1", "c2", "c3"], ["d"], ["f"]]
    assert [call["steps"] for call in rec.calls] == [2, 3, 2, 2, 3]
    assert sizes == [1, 3, 3, 1, 1]


def test_a_job_larger_than_max_batch_runs_in_consecutive_batches(pipe):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec, max_batch=2)
    big = engine.submit(KEY, specs("p0", "p1", "p2", "p3", "p4", seed=20))
    small = engine.submit(KEY, specs("after"))
    engine.start()
    engine.stop(drain=True, timeout=TIMEOUT)
    assert sizes == [2, 2, 1, 1]
    assert rec.calls[2]["prompts"] == ["p4"] and rec.calls[3]["prompts"] == ["after"]
    progress = [(e["step"], e["steps"]) for e in events(big) if e["type"] == "progress"]
    assert progress == [(i, 6) for i in range(1, 7)]
    assert big.status == small.status == "done" and len(big.image_names) == 5
    assert_same(decoded(engine, big.image_names[4])[0], alone(pipe, big.images[4], KEY))


# ---------------------------------------------------------------------------------------- queue bounds, stop


def test_queue_full_and_shutting_down(pipe):
    engine, _ = make_engine(pipe, max_queue=3)
    engine.submit(KEY, specs("a", "b"))
    engine.submit(KEY, specs("c"))
    assert engine.queue_depth == 3
    with pytest.raises(QueueFull) as full:
        engine.submit(KEY, specs("d"))
    assert full.value.retry_after > 0
    with pytest.raises(ValueError):
        engine.submit(KEY, specs("1", "2", "3", "4"))  # could never fit
    with pytest.raises(ValueError):
        engine.submit(KEY, specs("a"), "gif")
    engine.start()
    engine.stop(drain=True, timeout=TIMEOUT)
    with pytest.raises(ShuttingDown):
        engine.submit(KEY, specs("late"))
    assert engine.queue_depth == 0


def test_retry_after_follows_recent_batch_times(pipe):
    engine, _ = make_engine(pipe, max_queue=1)
    engine.start()
    wait(engine.submit(KEY, specs("warm")))
    rec = Recorder(pipe)
    engine.pipe = rec
    rec.hold = True
    engine.submit(KEY, specs("running"))
    assert rec.entered.wait(TIMEOUT)
    engine.submit(KEY, specs("waiting"))
    with pytest.raises(QueueFull) as full:
        engine.submit(KEY, specs("refused"))
    batch_seconds = engine._recent[-1][1]
    assert full.value.retry_after == pytest.approx(max(0.1, batch_seconds))
    rec.go.set()
    engine.stop()


def test_stop_drain_finishes_queued_jobs(pipe):
    engine, sizes = make_engine(pipe)
    jobs = [engine.submit(key, specs(f"p{i}")) for i, key in enumerate((KEY, OTHER, KEY))]
    engine.start()
    engine.stop(drain=True, timeout=TIMEOUT)
    assert [j.status for j in jobs] == ["done"] * 3
    assert not engine._thread.is_alive()


def test_stop_without_drain_cancels_queued_jobs_and_finishes_the_running_one(pipe):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec)
    rec.hold = True
    running = engine.submit(KEY, specs("running"))
    engine.start()
    assert rec.entered.wait(TIMEOUT)
    queued = [engine.submit(KEY, specs("q1")), engine.submit(OTHER, specs("q2"))]
    stopper = threading.Thread(target=engine.stop, kwargs={"drain": False, "timeout": TIMEOUT})
    stopper.start()
    deadline = time.monotonic() + TIMEOUT
    while any(j.status == "queued" for j in queued) and time.monotonic() < deadline:
        time.sleep(0.01)
    rec.go.set()
    stopper.join(TIMEOUT)
    assert not engine._thread.is_alive()
    assert running.status == "done" and [j.status for j in queued] == ["cancelled"] * 2
    assert len(rec.calls) == 1 and sizes == [1]


# ----------------------------------------------------------------------------------------------- cancelling


def test_cancel_while_queued_never_runs(pipe):
    rec = Recorder(pipe)
    engine, _ = make_engine(rec)
    a, b, c = (engine.submit(KEY, specs(p)) for p in ("a", "b", "c"))
    b.cancel()
    assert b.status == "cancelled" and engine.queue_depth == 2 and c.position == 1
    engine.start()
    engine.stop(drain=True, timeout=TIMEOUT)
    assert rec.calls[0]["prompts"] == ["a", "c"]
    assert [e["type"] for e in events(b)] == ["queued", "cancelled"]
    assert [e for e in events(c) if e["type"] == "queued"] == [
        {"type": "queued", "position": 2},
        {"type": "queued", "position": 1},
    ]
    b.cancel()  # terminal: nothing happens
    assert b.status == "cancelled" and a.status == c.status == "done"


def test_cancel_while_running_alone_stops_between_steps(pipe):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec)
    key = BatchKey(256, 256, 4, "dpm", 2.5, 0.0)
    rec.pause_at = 0
    job = engine.submit(key, specs("stop me"))
    engine.start()
    assert rec.entered.wait(TIMEOUT)  # after step 1 of 4
    job.cancel()
    assert job.status == "cancelled"
    rec.go.set()
    after = engine.submit(KEY, specs("next"))
    wait(after)
    engine.stop()
    assert rec.steps_seen[0] == [0, 1]  # the sampler stopped after the step in flight, before the last
    assert [e["type"] for e in events(job)] == ["queued", "running", "progress", "cancelled"]
    assert job.image_names == [] and engine.image(f"{job.id}-0.png") is None
    assert after.status == "done" and sizes == [1, 1]


def test_cancel_one_job_of_a_shared_batch_others_finish(pipe):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec)
    rec.pause_at = 0
    gone = engine.submit(KEY, specs("gone"))
    kept = engine.submit(KEY, specs("kept", seed=5))
    engine.start()
    assert rec.entered.wait(TIMEOUT)
    gone.cancel()
    rec.go.set()
    wait(kept)
    engine.stop()
    assert sizes == [2] and rec.steps_seen[0] == [0, 1]
    assert kept.status == "done" and gone.status == "cancelled"
    assert engine.image(f"{gone.id}-0.png") is None and gone.image_names == []
    assert [e["step"] for e in events(gone) if e["type"] == "progress"] == [1]
    assert [e["step"] for e in events(kept) if e["type"] == "progress"] == [1, 2]
    assert_same(decoded(engine, kept.image_names[0])[0], alone(pipe, kept.images[0], KEY))


# -------------------------------------------------------------------------------------------------- events


def test_events_follow_live_and_replay_for_late_subscribers(pipe):
    engine, _ = make_engine(pipe)
    first = engine.submit(OTHER, specs("first"))
    job = engine.submit(KEY, specs("second", "third"))

    async def follow():
        async def collect():
            return [e async for e in job.events()]

        consumers = [asyncio.create_task(collect()) for _ in range(3)]
        await asyncio.sleep(0.05)  # subscribed before the worker starts
        engine.start()
        return await asyncio.wait_for(asyncio.gather(*consumers), TIMEOUT)

    live = asyncio.run(follow())
    expected = [
        {"type": "queued", "position": 1},
        {"type": "queued", "position": 0},
        {"type": "running"},
        {"type": "progress", "step": 1, "steps": 2},
        {"type": "progress", "step": 2, "steps": 2},
        {"type": "done", "images": [f"{job.id}-0.png", f"{job.id}-1.png"]},
    ]
    assert live == [expected] * 3
    assert events(job) == expected  # replay after the end
    assert job.image_names == expected[-1]["images"] and job.step == job.steps == 2
    assert events(first)[0] == {"type": "queued", "position": 0}
    assert engine.get(job.id) is job and engine.get("nope") is None
    engine.stop()


# --------------------------------------------------------------------------------------------------- store


def test_store_media_types(pipe):
    engine, _ = make_engine(pipe)
    engine.start()
    jobs = {fmt: engine.submit(KEY, specs("a red circle"), fmt) for fmt in ("png", "jpeg", "webp")}
    engine.stop(drain=True, timeout=TIMEOUT)
    expected = [("png", "PNG", "image/png"), ("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")]
    for fmt, pil_format, media_type in expected:
        data, got_type = engine.image(jobs[fmt].image_names[0])
        assert got_type == media_type
        assert Image.open(io.BytesIO(data)).format == pil_format
    assert engine.image("unknown.png") is None


def test_store_evicts_by_age(pipe):
    engine, _ = make_engine(pipe, keep_seconds=1.0)
    engine.start()
    job = engine.submit(KEY, specs("a red circle"))
    wait(job)
    assert engine.image(job.image_names[0]) is not None and engine.get(job.id) is job
    time.sleep(1.1)
    assert engine.image(job.image_names[0]) is None
    assert engine.get(job.id) is None and engine.stored_bytes == 0
    engine.stop()


def test_store_evicts_oldest_by_bytes(pipe):
    probe, _ = make_engine(pipe)
    probe.start()
    first = probe.submit(KEY, specs("a red circle"))
    wait(first)
    size = len(probe.image(first.image_names[0])[0])
    probe.stop()

    engine, _ = make_engine(pipe, keep_bytes=int(size * 1.5))
    engine.start()
    a = engine.submit(KEY, specs("a red circle"))
    wait(a)
    assert engine.stored_bytes == size
    b = engine.submit(KEY, specs("a red circle"))
    wait(b)
    assert engine.image(a.image_names[0]) is None  # oldest first
    assert engine.image(b.image_names[0]) is not None and engine.stored_bytes == size
    engine.stop()


# --------------------------------------------------------------------------------------------------- errors


def test_a_failing_batch_marks_its_jobs_and_the_worker_continues(pipe, caplog):
    rec = Recorder(pipe)
    engine, sizes = make_engine(rec)
    rec.fail = RuntimeError("boom\nsecond line")
    bad = [engine.submit(KEY, specs("x")), engine.submit(KEY, specs("y"))]
    engine.start()
    for job in bad:
        wait(job)
    assert [j.status for j in bad] == ["error", "error"]
    assert bad[0].error == "RuntimeError: boom second line"
    assert events(bad[1])[-1] == {"type": "error", "message": "RuntimeError: boom second line"}
    assert "boom" in caplog.text and "Traceback" in caplog.text

    rec.fail = UserError("steps must be a positive integer, got 0")
    user = engine.submit(KEY, specs("z"))
    wait(user)
    assert user.status == "error" and user.error == "steps must be a positive integer, got 0"

    good = engine.submit(KEY, specs("fine"))
    wait(good)
    engine.stop()
    assert good.status == "done" and sizes == [2, 1, 1]
