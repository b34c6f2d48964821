"""Step-level batching across requests: one denoiser serves many requests at once.

Requests join and leave at step boundaries. Each tick admits waiting requests while the largest built
batch has room, runs one unet_deep call over the requests on a DeepCache refresh step and one
unet_shallow call over the rest (`StableDiffusion.step`), and decodes the requests that finished in
one VAE call. Every request keeps its own `Work`: scheduler state, seed, guidance, step count,
scheduler kind, DeepCache interval and schedule, img2img strength and cache decision.

Transport-agnostic: the Triton denoiser submits requests from `execute` and answers them from `done`;
tests drive it in process on the same runners.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import VoltacacheError
from ..request import Request
from .stable_diffusion import Generation, StableDiffusion, Stats, Work


class Cancelled(VoltacacheError):
    """The client went away; the request's slot is free again."""


@dataclass
class Ticket:
    """A submitted request and how to answer it: `done(result, error)` is called exactly once."""

    request: Request
    embeddings: np.ndarray
    pooled: np.ndarray
    done: Callable[[Generation | None, BaseException | None], None]
    cancelled: Callable[[], bool | str | None] = lambda: False  # truthy (a reason) once the client went away
    submitted: float = field(default_factory=time.perf_counter)
    work: Work | None = None

    def answer(self, result: Generation | None = None, error: BaseException | None = None) -> None:
        if result is not None:
            result.seconds = time.perf_counter() - self.submitted
        self.done(result, error)


@dataclass
class Tick:
    """What one tick did, for the metrics: images per U-Net call (the batch occupancy) and times."""

    active: int = 0
    deep_images: int = 0
    shallow_images: int = 0
    admitted: int = 0
    finished: int = 0
    queue_seconds: list = field(default_factory=list)  # of the requests admitted in this tick
    seconds: float = 0.0


class StepBatcher:
    def __init__(self, pipeline: StableDiffusion, cache=None, capacity: int | None = None, on_tick=None):
        self.pipeline, self.cache, self.on_tick = pipeline, cache, on_tick
        # images per U-Net call: the largest built batch (a request is `pipeline.batch` images)
        self.capacity = capacity or max(pipeline.batch_sizes)
        self.waiting: deque[Ticket] = deque()
        self.active: list[Ticket] = []
        self.changed = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None

    def submit(self, ticket: Ticket) -> None:
        """Queue a request; a request these engines cannot serve is answered with why at once (its one check)."""
        try:
            self.pipeline.check(ticket.request)
        except Exception as e:
            ticket.answer(error=e)
            return
        with self.changed:
            if self.closed:
                raise VoltacacheError("the denoiser is shutting down")
            self.waiting.append(ticket)
            self.changed.notify()

    def start(self) -> StepBatcher:
        self.thread = threading.Thread(target=self.serve, name="voltacache-step-batcher", daemon=True)
        self.thread.start()
        return self

    def serve(self) -> None:
        """Tick while there is work; sleep until a request arrives."""
        while True:
            with self.changed:
                while not (self.waiting or self.active or self.closed):
                    self.changed.wait()
                if self.closed:
                    return
            try:
                self.tick()
            except Exception as e:  # a bug of ours: fail what is in flight, keep serving the rest
                for ticket in self.active:
                    ticket.answer(error=e)
                self.active = []

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify()
            pending, self.waiting = list(self.waiting), deque()
        if self.thread is not None:
            self.thread.join()
        for ticket in pending + self.active:
            ticket.answer(error=VoltacacheError("the denoiser shut down before this request finished"))
        self.active = []

    def tick(self) -> Tick:
        started = time.perf_counter()
        tick = Tick()
        self._drop_cancelled()  # first: a slot freed by a client that went away is taken in this tick
        self._admit(tick)
        works = [t.work for t in self.active]
        tick.active = len(works)
        tick.deep_images = sum(self.pipeline.batch for w in works if w.full)
        tick.shallow_images = sum(self.pipeline.batch for w in works if not w.full)
        failed = dict((id(w), e) for w, e in self.pipeline.step(works))
        finished = []
        for ticket in list(self.active):
            if id(ticket.work) in failed:
                self.active.remove(ticket)
                ticket.answer(error=failed[id(ticket.work)])
            elif ticket.work.done:
                self.active.remove(ticket)
                finished.append(ticket)
        self._finish(finished)
        tick.finished = len(finished)
        tick.seconds = time.perf_counter() - started
        if self.on_tick is not None:
            self.on_tick(tick)
        return tick

    def _admit(self, tick: Tick) -> None:
        """Begin waiting requests while the U-Net calls have room: the cache lookup, the timesteps, the
        first latents (a semantic hit is answered at once). A request that fails here fails alone."""
        batch = self.pipeline.batch
        while True:
            with self.changed:
                if not self.waiting or (len(self.active) + 1) * batch > self.capacity:
                    return
                ticket = self.waiting.popleft()
            tick.admitted += 1
            tick.queue_seconds.append(time.perf_counter() - ticket.submitted)
            why = ticket.cancelled()
            if why:
                ticket.answer(error=Cancelled(f"{why} before it started" if isinstance(why, str) else "cancelled"))
                continue
            try:
                work = self.pipeline.begin(ticket.request, ticket.embeddings, ticket.pooled, Stats(), self.cache)
            except Exception as e:
                ticket.answer(error=e)
                continue
            if isinstance(work, Generation):
                ticket.answer(work)
            else:
                ticket.work = work
                self.active.append(ticket)

    def _drop_cancelled(self) -> None:
        for ticket in list(self.active):
            why = ticket.cancelled()
            if why:
                self.active.remove(ticket)
                steps = f"after {ticket.work.index} of {len(ticket.work.timesteps)} steps"
                ticket.answer(error=Cancelled(f"{why} {steps}" if isinstance(why, str) else f"cancelled {steps}"))

    def _finish(self, tickets: list[Ticket]) -> None:
        """Decode together; if that fails, one by one, so that one bad request fails alone."""
        if not tickets:
            return
        try:
            results = self.pipeline.finish([t.work for t in tickets])
        except Exception:
            for ticket in tickets:
                self._finish_one(ticket)
            return
        for ticket, result in zip(tickets, results):
            ticket.answer(result)

    def _finish_one(self, ticket: Ticket) -> None:
        try:
            result = self.pipeline.finish([ticket.work])[0]
        except Exception as e:
            ticket.answer(error=e)
        else:
            ticket.answer(result)
