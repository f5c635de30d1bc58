"""The batching engine of `sana serve`: a bounded queue of jobs, one worker thread, live job events.

    engine = Engine(pipe, max_batch=8, max_queue=64)
    engine.start()
    job = engine.submit(BatchKey(...), [ImageSpec(prompt, negative, seed), ...], "png")  # or QueueFull
    async for event in job.events(): ...   # queued (position), running, progress i/n, done | error | cancelled
    engine.image(job.image_names[0])       # (encoded bytes, media type)
    engine.stop(drain=True)

A job is a list of images that share one `BatchKey` (size, steps, sampler, guidance use, for image edits
the strength, and with a control image the ControlNet's scale). Image i of a request uses seed `seed + i` as
`sana generate` does; the caller builds the `ImageSpec`s, the engine runs them as given. An edit's specs carry
its input image and mask, a controlled one's its control image (decoded PIL images); requests batch together
when their keys agree, each image with its own input and control image (the pipeline takes one per prompt).

Batching. One worker thread runs one pipeline call at a time (the model is compute-bound). It takes the oldest
queued job and fills the batch, up to `max_batch` images, with the following queued jobs of the same key, in
queue order; it stops at the first such job that does not fit whole in the room left (a job is never split
and never overtaken by a later job of its own key), and jobs of other keys keep their places. A job with more
than `max_batch` images runs alone, in consecutive batches of `max_batch` images (its progress counts the steps
of all of them: `steps` = steps per batch x batches). The batch is one call with a list of seeds, so every image
has its own generator and equals the image made alone. The queue fills while a batch runs, so the worker never
waits for more work.

Cancelling. A queued job leaves the queue. A running job ends at once ("cancelled"); its images are dropped,
and when every job of its batch is cancelled the batch stops after the step in flight (the sampler's callback
raises). A client that disconnects from a synchronous request is cancelled this way by the app.

Memory. Encoded images live in an in-memory store bounded by `keep_seconds` and `keep_bytes` (oldest evicted
first); terminal jobs are forgotten `keep_seconds` after they ended (and beyond `keep_jobs` of them), so the
engine's memory stays bounded however many requests it serves. Expiry runs on every submit, get and image
call and whenever the idle worker wakes.

Threads. All shared state is guarded by one condition variable (`Engine._cv`); only the worker calls the
pipeline. Events cross to asyncio consumers through each job's event list: the worker appends under the job's
lock and wakes each consumer's `asyncio.Event` with `loop.call_soon_threadsafe`; a consumer replays the list
from the start, so a late subscriber sees everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL.PngImagePlugin import PngInfo

from sana.errors import UserError
from sana.images import PARAMETERS_KEY

if TYPE_CHECKING:
    from PIL import Image

    from sana.pipeline import SanaPipeline
    from sana.samplers import StepInfo

# output format -> (file extension, media type, PIL format)
FORMATS = {
    "png": ("png", "image/png", "PNG"),
    "jpeg": ("jpg", "image/jpeg", "JPEG"),
    "webp": ("webp", "image/webp", "WEBP"),
}
TERMINAL = frozenset({"done", "error", "cancelled"})


@dataclass(frozen=True)
class ImageSpec:
    """One image of a job."""

    prompt: str
    negative_prompt: str
    seed: int
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # an edit's input
    mask: Image.Image | None = field(default=None, compare=False, repr=False)  # None: repaint everywhere
    control: Image.Image | None = field(default=None, compare=False, repr=False)  # the ControlNet's input


@dataclass(frozen=True)
class BatchKey:
    """Images with equal keys can share a forward pass. The field names are the pipeline's keyword arguments."""

    height: int
    width: int
    steps: int
    sampler: str
    guidance_scale: float
    pag_scale: float
    strength: float = 1.0
    edit: bool = False  # the images start from their specs' input images (img2img, inpainting)
    control_scale: float = 1.0
    control: bool = False  # a ControlNet steers the images with their specs' control images

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of the pipeline call these images share (`edit` and `control` are not: the
        images themselves travel in the specs)."""
        settings = dataclasses.asdict(self)
        del settings["edit"], settings["control"]
        return settings


class QueueFull(Exception):
    """The queue holds `max_queue` images; `retry_after` estimates (from recent batch times) the seconds until
    the job would fit."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the queue is full, retry in {retry_after:.1f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The engine is stopping and accepts no new work."""


class _BatchCancelled(Exception):
    """Raised from the sampler callback to stop a batch whose jobs are all cancelled."""


def one_line(error: BaseException) -> str:
    """An exception as a one-line message for a job's error."""
    text = " ".join(str(error).split())
    if isinstance(error, UserError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def encode_image(image: Image.Image, output_format: str) -> bytes:
    """A PIL image as the bytes of a png / jpeg / webp file; a PNG keeps the generation parameters."""
    buffer = io.BytesIO()
    fmt = FORMATS[output_format][2]
    if fmt == "PNG":
        info = None
        if PARAMETERS_KEY in image.info:
            params = json.loads(image.info[PARAMETERS_KEY])
            params.pop("index_in_batch", None)  # the place in a server batch means nothing to the client
            info = PngInfo()
            info.add_text(PARAMETERS_KEY, json.dumps(params, sort_keys=True))
        image.save(buffer, format=fmt, pnginfo=info, compress_level=4)
    else:
        image.convert("RGB").save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


class Job:
    """A request's images, from submission to a terminal status. Public fields are written by the engine under
    its lock; read them freely."""

    def __init__(self, engine: Engine, key: BatchKey, images: tuple[ImageSpec, ...], output_format: str) -> None:
        self.id = uuid.uuid4().hex
        self.key = key
        self.images = images
        self.output_format = output_format
        self.status = "queued"  # queued | running | done | error | cancelled
        self.position: int | None = None  # images ahead of this job's first image while queued (0 = next)
        self.step = 0
        self.steps = key.steps
        self.image_names: list[str] = []
        self.error: str | None = None
        self.created = time.time()
        self.finished: float | None = None  # time.time() when the job reached a terminal status
        self._engine = engine
        self._lock = threading.Lock()  # guards _events and _waiters
        self._events: list[dict[str, Any]] = []
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status} {len(self.images)} images>"

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def cancel(self) -> None:
        """Queued: removed from the queue. Running: its images are dropped, and the batch stops between steps
        if every job in it is cancelled. Terminal: nothing."""
        self._engine._cancel(self)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event so far, then the live ones; ends after the terminal event (done, error, cancelled)."""
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        with self._lock:
            self._waiters.add(waiter)
        seen = 0
        try:
            while True:
                with self._lock:
                    new = self._events[seen:]
                    waiter[1].clear()  # an event appended after this wakes us through call_soon_threadsafe
                seen += len(new)
                for event in new:
                    yield dict(event)
                    if event["type"] in TERMINAL:
                        return
                if not new:
                    await waiter[1].wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    async def wait(self) -> None:
        """Return when the job has reached a terminal status."""
        async for _ in self.events():
            pass

    def _emit(self, event: dict[str, Any]) -> None:
        """Append an event and wake every consumer (any thread)."""
        with self._lock:
            self._events.append(event)
            waiters = list(self._waiters)
        for loop, flag in waiters:
            with contextlib.suppress(RuntimeError):  # RuntimeError: that consumer's loop is closed
                loop.call_soon_threadsafe(flag.set)


@dataclass
class _Stored:
    data: bytes
    media_type: str
    stored: float


class Engine:
    """The queue, the worker thread and the image store of a server sharing one `SanaPipeline`."""

    def __init__(
        self,
        pipe: SanaPipeline,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        keep_seconds: float = 3600.0,
        keep_bytes: int = 512 * 2**20,
        on_batch: Callable[[int, float], None] | None = None,
        torch_threads: int | None = None,
    ) -> None:
        """max_queue: images waiting (not yet running). on_batch(batch_size, seconds): called after each
        pipeline call that started (finished, failed or stopped by cancellation), from the worker thread.
        torch_threads: the intra-op threads the worker computes with (see `cpu_threads_for_worker`)."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        if keep_seconds <= 0 or keep_bytes <= 0:
            raise ValueError(f"keep_seconds and keep_bytes must be > 0, got {keep_seconds} and {keep_bytes}")
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.keep_seconds = keep_seconds
        self.keep_bytes = keep_bytes
        self.keep_jobs = 10_000  # terminal jobs remembered at most, whatever their age
        self.on_batch = on_batch
        self.torch_threads = torch_threads
        self.log = logging.getLogger("sana.server")
        self._cv = threading.Condition()  # guards everything below and every Job's public fields
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._ended: deque[Job] = deque()  # terminal jobs, in the order they ended
        self._store: OrderedDict[str, _Stored] = OrderedDict()  # oldest first
        self._store_bytes = 0
        self._recent: deque[tuple[int, float]] = deque(maxlen=16)  # (images, seconds) of finished batches
        self._accepting = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ public

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cv:
            if self._thread is not None or not self._accepting:
                raise RuntimeError("the engine was already started or stopped")
            self._thread = threading.Thread(target=self._work, name="sana-engine", daemon=True)
            self._thread.start()

    def submit(self, key: BatchKey, images: Sequence[ImageSpec], output_format: str = "png") -> Job:
        """Queue a job. QueueFull when its images do not fit in the queue, ShuttingDown after stop(); a
        ValueError for a job that could never run (no images, more than max_queue, unknown format)."""
        images = tuple(images)
        if not images:
            raise ValueError("a job needs at least one image")
        if len(images) > self.max_queue:
            raise ValueError(f"a job of {len(images)} images can never fit a queue of {self.max_queue}")
        if output_format not in FORMATS:
            raise ValueError(f"output format must be one of {', '.join(FORMATS)}, got {output_format!r}")
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            self._expire_locked()
            depth = self._depth_locked()
            if depth + len(images) > self.max_queue:
                raise QueueFull(self._retry_after_locked(depth + len(images) - self.max_queue))
            job = Job(self, key, images, output_format)
            job.position = depth
            self._queue.append(job)
            self._jobs[job.id] = job
            job._emit({"type": "queued", "position": depth})
            self._cv.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            self._expire_locked()
            return self._jobs.get(job_id)

    def release(self, job: Job) -> None:
        """Forget a finished job and its images now, not after keep_seconds: for a synchronous request whose
        images went out in the response, keeping them would only grow the server's memory."""
        with self._cv:
            if job.status not in TERMINAL:
                raise ValueError(f"job {job.id} is {job.status}; only a finished job can be released")
            for name in job.image_names:
                entry = self._store.pop(name, None)
                if entry is not None:
                    self._store_bytes -= len(entry.data)
            self._jobs.pop(job.id, None)

    def image(self, name: str) -> tuple[bytes, str] | None:
        """(encoded bytes, media type) of a stored image; None when unknown or expired."""
        with self._cv:
            self._expire_locked()
            entry = self._store.get(name)
            return None if entry is None else (entry.data, entry.media_type)

    @property
    def queue_depth(self) -> int:
        """Images waiting (not yet running)."""
        with self._cv:
            return self._depth_locked()

    @property
    def stored_bytes(self) -> int:
        """Bytes of encoded images held in the store."""
        with self._cv:
            return self._store_bytes

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work (submit raises ShuttingDown). drain=True: the worker finishes the queued and the
        running jobs, then exits; drain=False: queued jobs are cancelled and the running batch finishes.
        Joins the worker (up to `timeout` seconds). Queued jobs of an engine never started are cancelled."""
        with self._cv:
            self._accepting = False
            if not drain or self._thread is None:
                while self._queue:
                    self._end_locked(self._queue.popleft(), "cancelled", {"type": "cancelled"})
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------------------- under the lock

    def _depth_locked(self) -> int:
        return sum(len(job.images) for job in self._queue)

    def _retry_after_locked(self, excess: int) -> float:
        """Seconds until `excess` waiting images have left the queue, at the recent throughput."""
        images = sum(n for n, _ in self._recent)
        seconds = sum(s for _, s in self._recent)
        if not images or seconds <= 0:
            return 1.0
        return max(0.1, excess * seconds / images)

    def _reposition_locked(self) -> None:
        """Recompute queued positions; a job whose position changed gets a new "queued" event."""
        ahead = 0
        for job in self._queue:
            if job.position != ahead:
                job.position = ahead
                job._emit({"type": "queued", "position": ahead})
            ahead += len(job.images)

    def _end_locked(self, job: Job, status: str, event: dict[str, Any]) -> None:
        job.status = status
        job.position = None
        job.finished = time.time()
        self._ended.append(job)
        job._emit(event)

    def _cancel(self, job: Job) -> None:
        with self._cv:
            if job.status == "queued":
                self._queue.remove(job)
                self._end_locked(job, "cancelled", {"type": "cancelled"})
                self._reposition_locked()
            elif job.status == "running":
                self._end_locked(job, "cancelled", {"type": "cancelled"})

    def _put_locked(self, name: str, data: bytes, media_type: str) -> None:
        self._store[name] = _Stored(data, media_type, time.time())
        self._store_bytes += len(data)

    def _expire_locked(self) -> None:
        """Evict images older than keep_seconds or beyond keep_bytes (oldest first), and forget terminal jobs
        that ended more than keep_seconds ago (or beyond keep_jobs)."""
        cutoff = time.time() - self.keep_seconds
        while self._store:
            name, entry = next(iter(self._store.items()))
            if entry.stored >= cutoff and self._store_bytes <= self.keep_bytes:
                break
            del self._store[name]
            self._store_bytes -= len(entry.data)
        while self._ended and (self._ended[0].finished < cutoff or len(self._ended) > self.keep_jobs):
            self._jobs.pop(self._ended.popleft().id, None)

    def _take_locked(self) -> tuple[list[Job], list[list[tuple[Job, int]]]]:
        """The next jobs to run and their batches of (job, image index): see the module docstring."""
        head = self._queue.popleft()
        jobs = [head]
        n = len(head.images)
        if n > self.max_batch:
            batches = [
                [(head, i) for i in range(k, min(k + self.max_batch, n))] for k in range(0, n, self.max_batch)
            ]
        else:
            room = self.max_batch - n
            for job in list(self._queue):
                if room == 0:
                    break
                if job.key != head.key:
                    continue
                if len(job.images) > room:
                    break  # FIFO within a key: a later job of this key never overtakes this one
                self._queue.remove(job)
                jobs.append(job)
                room -= len(job.images)
            batches = [[(job, i) for job in jobs for i in range(len(job.images))]]
        for job in jobs:
            job.status = "running"
            job.position = None
            job.step = 0
            job.steps = head.key.steps * len(batches)
            job._emit({"type": "running"})
        self._reposition_locked()
        return jobs, batches

    # ------------------------------------------------------------------------------------------ worker

    def _work(self) -> None:
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)  # this thread's OpenMP team, see cpu_threads_for_worker
        idle = min(5.0, max(0.05, self.keep_seconds / 2))
        while True:
            with self._cv:
                while not self._queue and self._accepting:
                    self._cv.wait(timeout=idle)
                    self._expire_locked()
                if not self._queue:
                    return  # stopping, and nothing left to drain
                jobs, batches = self._take_locked()
            try:
                self._run(jobs, batches)
            except Exception as error:  # a bug of the engine's own: keep serving, end the jobs it held
                self.log.exception("the engine failed on a batch")
                with self._cv:
                    for job in jobs:
                        if job.status == "running":
                            job.error = one_line(error)
                            self._end_locked(job, "error", {"type": "error", "message": job.error})

    def _run(self, jobs: list[Job], batches: list[list[tuple[Job, int]]]) -> None:
        """Run the batches of one take, store the images of the jobs still running, mark them done (or error)."""
        fmt = {job: FORMATS[job.output_format] for job in jobs}
        encoded: dict[Job, list[bytes | None]] = {job: [None] * len(job.images) for job in jobs}
        try:
            for b, entries in enumerate(batches):
                members = list(dict.fromkeys(job for job, _ in entries))
                with self._cv:
                    if not any(job.status == "running" for job in members):
                        raise _BatchCancelled
                images = self._call(entries, members, offset=b * jobs[0].key.steps)
                for (job, i), image in zip(entries, images, strict=True):
                    if job.status == "running":  # a cancelled job's images are dropped
                        encoded[job][i] = encode_image(image, job.output_format)
        except _BatchCancelled:
            pass  # every job of the batch was cancelled and has ended already
        except Exception as error:
            self.log.exception("a batch of %d job(s) failed", len(jobs))
            message = one_line(error)
            with self._cv:
                for job in jobs:
                    if job.status == "running":
                        job.error = message
                        self._end_locked(job, "error", {"type": "error", "message": message})
            return
        with self._cv:
            for job in jobs:
                if job.status != "running":
                    continue
                ext, media_type, _ = fmt[job]
                names = []
                for i, data in enumerate(encoded[job]):
                    name = f"{job.id}-{i}.{ext}"
                    self._put_locked(name, data, media_type)
                    names.append(name)
                job.image_names = names
                self._end_locked(job, "done", {"type": "done", "images": list(names)})
            self._expire_locked()

    def _call(self, entries: list[tuple[Job, int]], members: list[Job], offset: int) -> list[Image.Image]:
        """One pipeline call for a batch; progress events from its callback, which stops the batch when every
        member is cancelled."""
        key = members[0].key
        specs = [job.images[i] for job, i in entries]

        def callback(info: StepInfo) -> None:
            with self._cv:
                live = [job for job in members if job.status == "running"]
                if not live:
                    raise _BatchCancelled
                for job in live:
                    job.step = offset + info.index + 1
                    job._emit({"type": "progress", "step": job.step, "steps": job.steps})

        start = time.perf_counter()
        finished = False
        try:
            images = self.pipe(
                [spec.prompt for spec in specs],
                negative_prompt=[spec.negative_prompt for spec in specs],
                seed=[spec.seed for spec in specs],
                **key.settings(),
                **image_inputs(key, specs),
                images_per_prompt=1,
                callback=callback,
            )
            finished = True
        finally:
            seconds = time.perf_counter() - start
            if finished:
                with self._cv:
                    self._recent.append((len(specs), seconds))
            if self.on_batch is not None:
                try:
                    self.on_batch(len(specs), seconds)
                except Exception:
                    self.log.exception("on_batch failed")
        return images


def image_inputs(key: BatchKey, specs: Sequence[ImageSpec]) -> dict[str, Any]:
    """The pipeline's image, mask_image and control_image arguments for a batch of images (one entry per image,
    each image being its own prompt; a mask of None repaints that image everywhere); nothing for plain text to
    image."""
    inputs: dict[str, Any] = {}
    if key.edit:
        inputs["image"] = [spec.image for spec in specs]
        if any(spec.mask is not None for spec in specs):
            inputs["mask_image"] = [spec.mask for spec in specs]
    if key.control:
        inputs["control_image"] = [spec.control for spec in specs]
    return inputs


def cpu_threads_for_worker() -> int:
    """Keep the calling (main) thread's torch work single-threaded and return the thread count the engine's
    worker should compute with; call it before the model is loaded.

    Why: with the OpenMP runtime of the CPU builds of torch, once one thread has run a multi-threaded region,
    parallel work started from another thread runs about 30 % slower (the shipped model at a batch of 8 on two
    cores: 3.6-3.8 images/s against 5.0-5.5 when one thread does everything). The server loads the model in the
    main thread and runs it in the worker, so the main thread is kept to one torch thread (it only loads the
    weights) and the worker gets the machine's threads back (`Engine(torch_threads=...)`).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads
