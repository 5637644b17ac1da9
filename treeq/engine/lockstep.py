"""Run one layer forward per calibration batch in lockstep, pausing every batch at each subset.

True-sequential quantization needs subset k's inputs computed with subsets 0..k-1 already
quantized. Re-running the layer from its start for every subset costs a forward per subset, and a
replay at the end. Here each batch's forward runs in its own thread and stops at a barrier (a
forward pre-hook on the subset's modules) after recording its input; once every batch has reached
subset k, the caller quantizes it and the forwards resume with the quantized weights in place. One
forward per layer gives both every subset's statistics and the next layer's inputs.

Only one batch thread runs at a time (the caller hands each the baton in turn), so torch's
intra-op threads are not oversubscribed and results do not depend on timing.

Paused batches hold their activations; where memory is the budget, :func:`run_rerunning` keeps
the same contract by re-running the layer per subset instead.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Any, Callable

import torch

from ..errors import TreeqError


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been seen."""


class _Abort(BaseException):
    """Unwinds a paused batch thread when the caller gives up on the layer."""


_local = threading.local()  # per worker thread: its _Worker, and the _Batch it is running


class _Worker:
    """A daemon thread that runs one job after another. Starting a thread per batch and layer
    costs ~20 ms each (the thread's OpenMP team and oneDNN state are built anew): on SmolLM2 a
    third of a layer's bf16 forwards."""

    THREAD_NAME = "treeq-lockstep"
    idle: list["_Worker"] = []
    alive: list["_Worker"] = []
    started = 0
    _lock = threading.Lock()

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        _Worker.started += 1
        _Worker.alive.append(self)
        self._thread = threading.Thread(target=self._loop, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        _local.worker = self
        while True:
            job = self._jobs.get()
            if job is None:
                # After the last job's release_current, which may come after retire_all began.
                with _Worker._lock:
                    if self in _Worker.idle:
                        _Worker.idle.remove(self)
                return
            job()
            del job  # an idle worker keeps nothing of the batch alive

    @classmethod
    def retire_all(cls) -> None:
        """End every worker once its current job is done, and wait for them. A live thread that
        has run torch ops keeps its own OpenMP team; while the teams' threads outnumber the cores,
        libgomp stops spinning between parallel regions, so every later region in the process
        waits for a sleeping thread to wake: after quantizing, a 2048->512 int4 decode matmul took
        135 us instead of 50 on a 2-core VM."""
        with cls._lock:
            workers, cls.alive = cls.alive, []
        for worker in workers:
            worker._jobs.put(None)
        for worker in workers:
            worker._thread.join()

    @classmethod
    def start(cls, job: Callable[[], None]) -> None:
        with cls._lock:
            worker = cls.idle.pop() if cls.idle else None
            if worker is None:
                worker = cls()
        worker._jobs.put(job)

    @classmethod
    def release_current(cls) -> None:
        """A job's last act: its worker may take the next job."""
        with cls._lock:
            cls.idle.append(_local.worker)


class _Batch:
    """One calibration batch's forward, run on a worker thread that pauses at barriers."""

    def __init__(self, run: Callable[[], Any]):
        self.position = -1  # index of the barrier it waits at; -1 before start
        self.recorded: set[int] = set()
        self.output = None
        self._run = run
        self._resume = threading.Semaphore(0)
        self._reports: queue.Queue = queue.Queue()
        self._abort = False
        self._finished = threading.Event()
        _Worker.start(self._main)

    def _main(self) -> None:
        _local.batch = self
        self._resume.acquire()
        try:
            if self._abort:
                return
            with torch.no_grad():  # grad mode is per thread
                self.output = self._run()
            self._reports.put(("done", None))
        except _Abort:
            pass
        except BaseException as e:  # handed to the caller's thread, which re-raises it
            self._reports.put(("error", e))
        finally:
            _local.batch = None
            _Worker.release_current()
            self._finished.set()

    def pause(self, position: int) -> None:
        """Called in this batch's thread: report the barrier reached, then wait for the baton."""
        self._reports.put(("paused", position))
        self._resume.acquire()
        if self._abort:
            raise _Abort

    def advance(self) -> bool:
        """Hand this batch the baton; returns once it pauses again (False) or finishes (True)."""
        self._resume.release()
        kind, value = self._reports.get()
        if kind == "error":
            raise value
        if kind == "paused":
            self.position = value
        return kind == "done"

    def abort(self) -> None:
        self._abort = True
        self._resume.release()
        self._finished.wait()


Barrier = tuple[str, list[torch.nn.Module], Callable[[torch.Tensor], None]]


def _hook(index: int, record: Callable[[torch.Tensor], None], barrier_names: list[str]):
    def hook(_module, args):
        batch = getattr(_local, "batch", None)
        if batch is None or index in batch.recorded:
            return  # not a lockstep forward, or another module of a subset already recorded
        if index < batch.position:
            raise TreeqError(
                f"subset {barrier_names[index]!r} ran after a later one in the spec; "
                "list the spec's subsets in the order the layer executes them"
            )
        batch.recorded.add(index)
        record(args[0])
        before = set(_module._forward_pre_hooks)
        batch.pause(index)
        return _late_hooks(_module, args, before)

    return hook


def _late_hooks(module: torch.nn.Module, args: tuple, before: set[int]) -> tuple:
    """``args`` through the pre-hooks installed on ``module`` while its call was paused (what the
    barrier quantized may quantize its inputs too): PyTorch took the call's list of hooks before
    running them, so without this the paused call alone would run on unquantized inputs."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if key not in before:
            out = hook(module, args)
            if out is not None:
                args = out if isinstance(out, tuple) else (out,)
    return args


def run_lockstep(
    forwards: list[Callable[[], Any]], barriers: list[Barrier], at_barrier: Callable[[int], None]
) -> list[Any]:
    """Drive ``forwards`` (one per batch) through ``barriers`` in order; returns their outputs.

    Each barrier is (name, modules, record): the first of ``modules`` to run in a batch calls
    ``record`` with its input and pauses the batch there. ``at_barrier(k)`` is called once every
    batch has recorded barrier k (or finished without reaching it); the forwards resume after it.
    """
    names = [name for name, _, _ in barriers]
    handles = [
        m.register_forward_pre_hook(_hook(i, rec, names)) for i, (_, mods, rec) in enumerate(barriers) for m in mods
    ]
    batches: list[_Batch] = []
    running: set[int] = set()
    try:
        for run in forwards:  # inside the try: batches already started are aborted if one fails
            batches.append(_Batch(run))
            running.add(len(batches) - 1)
        for k in range(len(barriers) + 1):
            for b in sorted(running):
                batch = batches[b]
                if batch.position >= k:
                    continue
                if batch.advance():
                    running.discard(b)
            if k < len(barriers):
                at_barrier(k)
    except BaseException:
        for b in running:
            batches[b].abort()
        raise
    finally:
        for handle in handles:
            handle.remove()
    return [batch.output for batch in batches]


@contextmanager
def batch_threads():
    """Batch threads are kept for reuse across the layers run inside this block, and ended when
    it exits."""
    try:
        yield
    finally:
        _Worker.retire_all()


def run_rerunning(
    forwards: list[Callable[[], Any]], barriers: list[Barrier], at_barrier: Callable[[int], None]
) -> None:
    """:func:`run_lockstep`'s contract without pausing batches mid-layer: for each barrier, every
    batch's forward is rerun from the layer's start until it records there, then abandoned. Only
    one batch's activations exist at a time (paused batches hold all of theirs), for about 1.4
    extra forwards per layer; the recorded inputs are the same. The caller runs the final forwards.
    """
    for k, (_, modules, record) in enumerate(barriers):

        def stop(_module, args):
            record(args[0])
            raise StopForward

        handles = [m.register_forward_pre_hook(stop) for m in modules]
        try:
            for forward in forwards:
                try:
                    forward()
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        at_barrier(k)
