"""Batches fetched ahead of the training loop.

`Prefetcher(loader, device)` wraps any loader with next_batch() / state_dict() / load_state_dict(). On CUDA a
background thread reads up to `depth` batches ahead, pins them and copies them to the GPU on a side stream
(non-blocking), so reading, collating and the host-to-device copy overlap the previous step's compute; the
training stream waits on each batch's copy event before using it. On CPU it passes calls straight through by
default: there is no copy to overlap, and on a few cores a reader thread competes with the training threads.

`state_dict()` describes the batches the caller has consumed, never the ones fetched ahead: with each batch the
thread records the loader's state right after reading it, and handing the batch over makes that the state. So a
checkpoint taken after k batches resumes at batch k + 1, whatever the prefetch depth.
"""

from __future__ import annotations

import copy
import queue
import threading

import torch


class Prefetcher:
    def __init__(self, loader, device: torch.device | str, depth: int = 2, threaded: bool | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.loader, self.device, self.depth = loader, torch.device(device), depth
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.threaded = self.cuda if threaded is None else threaded
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = None  # the loader's state after the last batch handed out; None: loader.state_dict() is it
        self._stream = torch.cuda.Stream(self.device) if self.cuda and self.threaded else None

    def __getattr__(self, name):  # anything else the loader offers (passes, upsampling_notes, ...)
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    # ------------------------------------------------------------------------------------------ the loader API

    def next_batch(self):
        if not self.threaded:
            return _to_device(self.loader.next_batch(), self.device, pin=False)
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()  # the reader has stopped; the loader is rewound to the last batch handed out
            raise item.error
        batch, state, event = item
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in _tensors(batch):
                tensor.record_stream(current)  # allocated on the side stream, freed after use on this one
        self._state = state
        return batch

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state) if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()  # batches read ahead from the old position are dropped
        self.loader.load_state_dict(state)
        self._state = None

    def close(self) -> None:
        """Stop the reader thread (if any) and drop the batches it read ahead; the next call restarts it from the
        state of the last batch handed out."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive() or not self._queue.empty():
            try:
                self._queue.get(timeout=0.05)  # unblock a put waiting for room
            except queue.Empty:
                pass
        self._thread = None
        if self._state is not None:
            self.loader.load_state_dict(self._state)  # rewind past the batches read ahead and not handed out
        self._state = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -------------------------------------------------------------------------------------------- the thread

    def _start(self) -> None:
        if self._state is None:  # nothing handed out yet: the consumed state is where the loader stands now
            self._state = copy.deepcopy(self.loader.state_dict())
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._read, name="fermion-prefetch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                batch = self.loader.next_batch()
                state = copy.deepcopy(self.loader.state_dict())
                event = None
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        batch = _to_device(batch, self.device, pin=True)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                else:
                    batch = _to_device(batch, self.device, pin=False)
                if not self._put((batch, state, event)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(error))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(batch):
    return batch.values() if isinstance(batch, dict) else batch


def _to_device(batch, device: torch.device, pin: bool):
    """A batch (tuple or dict of tensors) on `device`; pinned first for an asynchronous host-to-device copy."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if pin and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(device, non_blocking=pin)

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return tuple(move(t) for t in batch)
