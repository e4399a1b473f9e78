"""Continuous batching: many concurrent requests share one model; new ones join the running batch at the
next step and finished or cancelled ones leave it, so a long answer never holds up a short one."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator

import torch

from gptsmith.engine.core import Batch, Engine, Sequence
from gptsmith.engine.params import SamplingParams, StreamEvent

log = logging.getLogger(__name__)


class GenerationRequest:
    """Handle to one submitted request. Consume its events with `events()` (threads) or `aevents()` (asyncio);
    the last event has `finish_reason` set ("stop", "length", "cancelled" or "error" with the message in text).
    `aevents()` merges the events that piled up while its consumer was busy into one (text and token ids
    concatenated), so a slow consumer does one piece of work per turn instead of one per token."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.id = uuid.uuid4().hex
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self._queue: queue.Queue[StreamEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._abuf: list[StreamEvent] = []  # touched only on the event loop's thread
        self._waiter: asyncio.Future | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _record(self, event: StreamEvent) -> None:
        self.completion_tokens += len(event.token_ids)
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            if event.finish_reason == "error":
                self.error = event.text

    def _push(self, event: StreamEvent) -> None:
        """On the event loop's thread."""
        self._abuf.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocking iterator; raises TimeoutError when no event arrives within `timeout` seconds."""
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event within {timeout}s") from None
            yield event
            if event.finish_reason:
                return

    async def aevents(self) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        with self._lock:  # switch delivery to this event loop, keeping whatever arrived before
            self._aloop = loop
            while not self._queue.empty():
                self._abuf.append(self._queue.get_nowait())
        try:
            while True:
                if not self._abuf:
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                events, self._abuf = self._abuf, []
                for event in _merge(events):
                    yield event
                    if event.finish_reason:
                        return
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()  # the client went away mid-stream
            raise


def _merge(events: list[StreamEvent]) -> list[StreamEvent]:
    """Consecutive events as one; an error stays its own event because its text is a message, not output."""
    if len(events) == 1:
        return events
    out: list[StreamEvent] = []
    run: list[StreamEvent] = []
    for e in events:
        if e.finish_reason == "error":
            out += _join(run) + [e]
            run = []
        else:
            run.append(e)
            if e.finish_reason:
                break
    return out + _join(run)


def _join(run: list[StreamEvent]) -> list[StreamEvent]:
    if len(run) <= 1:
        return run
    return [StreamEvent("".join(e.text for e in run), [t for e in run for t in e.token_ids], run[-1].finish_reason)]


def deliver(pairs: list[tuple[GenerationRequest, StreamEvent]]) -> None:
    """Hand a scheduler step's events to their consumers: thread consumers through their queue, asyncio ones
    with ONE thread-safe callback per event loop per step (not one per token: each call_soon_threadsafe wakes
    the loop through its self-pipe, and at 16 streams that was 16 wake-ups per decode step)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for req, event in pairs:
        req._record(event)
        with req._lock:
            if req._aloop is None:
                req._queue.put(event)
            else:
                by_loop.setdefault(req._aloop, []).append((req, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_fan_out, items)
        except RuntimeError:  # the consumers' event loop is gone: nobody is listening any more
            for req, _ in items:
                req.cancelled = True


def _fan_out(items: list[tuple[GenerationRequest, StreamEvent]]) -> None:
    for req, event in items:
        req._push(event)


class BatchScheduler:
    """`stream_interval` (seconds): hand tokens to consumers at most this often, except first tokens and ends,
    which go out at once. Each hand-over costs the consumer a wake-up, and in a server every wake-up is an SSE
    write that competes with decoding for the GIL; 0 delivers every step."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, stream_interval: float = 0.0):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.stream_interval = stream_interval
        self._held: list[tuple[GenerationRequest, StreamEvent]] = []
        self._last_delivery = 0.0
        self._incoming: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._batch: Batch | None = None
        self._active: dict[int, GenerationRequest] = {}  # id(Sequence) -> request

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="gptsmith-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        left = list(self._incoming) + list(self._active.values())
        self._deliver([(req, StreamEvent("", [], "cancelled")) for req in left], now=True)
        self._incoming.clear()
        self._active.clear()
        self._batch = None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
        """Thread-safe. Bad prompts or params come back as the request's "error" event, not as an exception."""
        req = GenerationRequest(prompt_ids, params)
        with self._cond:
            self._incoming.append(req)
            self._cond.notify()
        if not self._running:
            self.start()
        return req

    @property
    def num_active(self) -> int:
        return len(self._active)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._incoming and not self._active:
                    self._cond.wait()
                if not self._running:
                    return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # never let one bad step kill the server: fail the requests it touched
                log.exception("scheduler step failed")
                self._fail_all(e)

    def _fail_all(self, e: Exception) -> None:
        self._deliver([(req, StreamEvent(f"{type(e).__name__}: {e}", [], "error")) for req in self._active.values()],
                      now=True)
        self._active.clear()
        self._batch = None  # its cache may be half written; the next request gets a fresh one

    def _step(self) -> None:
        if self._batch is None:
            self._batch = Batch(self.engine, self.max_batch_size, self.engine.max_context)
        batch = self._batch
        out: list[tuple[GenerationRequest, StreamEvent]] = []  # delivered together, see deliver()
        # drop cancelled requests first so their slots can be reused right away
        for seq in list(batch.seqs):
            req = self._active[id(seq)]
            if req.cancelled:
                batch.remove(seq)
                del self._active[id(seq)]
                out.append((req, StreamEvent("", [], "cancelled")))
        while not batch.full:
            with self._cond:
                if not self._incoming:
                    break
                req = self._incoming.popleft()
            if req.cancelled:
                out.append((req, StreamEvent("", [], "cancelled")))
                continue
            try:
                seq = Sequence(self.engine, req.prompt_ids, req.params)
                event = batch.add(seq)
            except Exception as e:  # this request's fault (bad prompt, params): report it, keep going
                out.append((req, StreamEvent(f"{e}", [], "error")))
                continue
            if not seq.finish_reason:
                self._active[id(seq)] = req
            out.append((req, event))
        if out:  # first tokens of new requests go out at once, before the decode step: lower time to first token
            self._deliver(out, now=True)
            out = []
        if batch.seqs:
            for seq, event in batch.step():
                req = self._active[id(seq)]
                if seq.finish_reason:
                    del self._active[id(seq)]
                out.append((req, event))
        self._deliver(out, now=any(e.finish_reason for _, e in out))

    def _deliver(self, out: list[tuple[GenerationRequest, StreamEvent]], now: bool) -> None:
        """Hold events until `stream_interval` has passed since the last delivery (or `now`); held events always
        belong to running requests, so the next step or their end sends them."""
        self._held += out
        t = time.monotonic()
        if self._held and (now or t - self._last_delivery >= self.stream_interval):
            held, self._held = self._held, []
            self._last_delivery = t
            deliver(held)
