"""Continuous batching: one thread owns the engine and runs its decode loop; requests join and leave between steps.

The HTTP handlers live on an asyncio event loop; the engine is plain blocking PyTorch. The scheduler thread takes
waiting jobs into free engine slots (prefilling each prompt as it joins), runs one batched decode step for every
live sequence, and hands each job its new text through a thread-safe call into the job's asyncio queue. A job that
finishes leaves at once and the next waiting one takes its slot at the next step, so a long answer never holds up a
short one and a burst of requests shares each forward pass instead of queueing behind one another.

A cancelled job (its client went away) is dropped from the waiting line or released from its slot before the next
step, so a disconnect costs at most one more step of work.

A sequence whose sampling fails (the engine ends it with finish_reason "error") fails its own job only; the other
sequences of the step go on. Only a failed forward pass, which has no per-sequence result, fails every running job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from fermion.infer.engine import Completion, Constraint, Engine, SamplingParams, Sequence
from fermion.infer.sampling import TokenLogprob

log = logging.getLogger("fermion.serve")


@dataclass
class Event:
    index: int  # the choice this event belongs to
    text: str = ""  # new text (may be empty on the final event)
    done: Completion | None = None  # set on the last event of a choice
    error: str | None = None  # the engine failed this choice
    logprobs: list[TokenLogprob] | None = None  # of the tokens since the last event, when the request asked


@dataclass
class Job:
    """One choice of one request: a prompt to continue, delivered as Events into its request's queue."""

    index: int
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    constraint: Constraint | None = None
    cancelled: bool = False
    sequence: Sequence | None = field(default=None, repr=False)

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Busy(Exception):
    """The waiting line is full."""


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # id(sequence) -> job
        self._cancelled: list[Job] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /health and tests)
        self.batched_tokens = 0  # tokens those steps produced
        self.most_running = 0  # the most sequences one step has decoded together
        self.aborted = 0  # sequences stopped before their end because their client went away

    # ------------------------------------------------------------------------------------- event-loop side

    def start(self) -> None:
        """Run the engine loop in a background thread (tests and embedding; `fermion serve` runs it in the main
        thread, see app.serve)."""
        self._thread = threading.Thread(target=self.run, name="fermion-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        with self._wake:
            if len(self._waiting) + len(jobs) > self.max_waiting:
                raise Busy(f"the server has {len(self._waiting)} requests waiting; try again shortly")
            self._waiting.extend(jobs)
            self._wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Stop generating for these jobs (finished ones are ignored); their slots are freed before the next step."""
        with self._wake:
            for job in jobs:
                if not job.cancelled:
                    job.cancelled = True
                    self._cancelled.append(job)
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.engine.max_batch,
                    "steps": self.steps, "tokens": self.batched_tokens, "most_running": self.most_running,
                    "aborted": self.aborted}

    # ------------------------------------------------------------------------------------ engine-thread side

    def run(self, alive=lambda: True) -> None:
        """The engine loop: admit, step, deliver; until stop() or until `alive()` turns false. Whatever is still
        running or waiting when it ends is told the server is shutting down."""
        try:
            while True:
                with self._wake:
                    while not (self._stop or self._waiting or self._running or self._cancelled) and alive():
                        self._wake.wait(0.5)
                    if self._stop or not alive():
                        break
                    cancelled, self._cancelled = self._cancelled, []
                    self._waiting = deque(job for job in self._waiting if not job.cancelled)
                    free = self.engine.max_batch - len(self.engine.active) + sum(
                        1 for job in cancelled if job.sequence is not None and not job.sequence.finished)
                    joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                for job in cancelled:
                    self._release(job)
                if joining:
                    self._admit(joining)
                if self._running:
                    self._step()
        finally:
            with self._wake:
                left, self._waiting = [*self._running.values(), *self._waiting], deque()
            for job in left:
                self._release(job)
                job.send(Event(job.index, error="the server is shutting down"))

    def _release(self, job: Job) -> None:
        seq = job.sequence
        if seq is not None and id(seq) in self._running:
            del self._running[id(seq)]
            if not seq.finished:
                self.engine.release(seq)
                self.aborted += 1

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the joining jobs together; if that fails, one by one, so only a job that cannot start fails."""
        try:
            added = self.engine.add_many([job.prompt for job in jobs], [job.params for job in jobs],
                                         [job.constraint for job in jobs])
        except Exception:  # noqa: BLE001 - validated requests should not fail here
            if len(jobs) > 1:
                for job in jobs:
                    self._admit([job])
                return
            log.exception("could not start a sequence")
            jobs[0].send(Event(jobs[0].index, error="could not start generating; see the server's log"))
            return
        for job, sequence in zip(jobs, added, strict=True):
            job.sequence = sequence
            self._running[id(sequence)] = job

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as err:  # noqa: BLE001 - a failed forward pass fails the requests in it, not the server
            log.exception("decode step failed")
            for job in list(self._running.values()):
                self._release(job)
                job.send(Event(job.index, error=f"generation failed: {err}"))
            return
        self.steps += 1
        self.batched_tokens += len(events)
        self.most_running = max(self.most_running, len(events))
        for seq, text in events:
            job = self._running.get(id(seq))
            if job is None:
                continue
            if seq.error is not None:  # this sequence alone failed; the engine has released it
                del self._running[id(seq)]
                log.error("a sequence failed: %s", seq.error, exc_info=seq.error)
                job.send(Event(job.index, error=f"generation failed: {seq.error}"))
            elif seq.finished:
                del self._running[id(seq)]
                job.send(Event(job.index, text, done=seq.completion(), logprobs=seq.take_logprobs()))
            elif text:
                job.send(Event(job.index, text, logprobs=seq.take_logprobs()))
