"""``SharedSlots``: request buffers in shared memory for workers on the gateway's own machine.

A 602 KB tensor sent as a Ray call's argument is copied through Ray's serialiser and gRPC on both sides:
3.3-4.4 ms a call on the 2-core machine against 0.9-1.4 ms for a 24-byte argument (bench/gateway.py's
notes, docs/performance.md).  A worker on the same machine can read the tensor where the gateway put it
instead: the gateway writes the request (``protocol.write_tensor_request``, one copy) into a slot, a file
in ``/dev/shm`` mapped by both processes, and the call carries only the slot's path and length
(``cluster.WorkerActor.infer_tensor_shm``; the worker copies the input out before it answers, so the slot is
free again once the call returns).

One slot per request in flight: ``acquire`` reuses a free slot or maps a new one (up to ``max_slots``;
None past that, or where ``/dev/shm`` is missing or full: the caller then sends the bytes with the call);
``release`` frees it; ``retire`` drops a slot that a worker may still read (a call that timed out): its file
is unlinked, never reused, and its pages go once the worker lets go of them.  ``close`` unlinks every file;
``remove_slots`` those of a process that was killed first (``serve`` gives its gateways one prefix).
Plain Python (Linux's ``/dev/shm``); used from one event loop.
"""

from __future__ import annotations

import itertools
import mmap
import os
from dataclasses import dataclass

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class Slot:
    """A mapped ``/dev/shm`` file of ``size`` bytes."""

    path: str
    size: int
    buf: mmap.mmap


class SharedSlots:
    """See the module docstring."""

    def __init__(self, slot_bytes: int, max_slots: int, prefix: str = "cortexbench-gw") -> None:
        self.slot_bytes = slot_bytes
        self.max_slots = max_slots
        self._prefix = f"{prefix}-{os.getpid()}-{id(self):x}"
        self._names = itertools.count()
        self._free: list[Slot] = []
        self._all: dict[str, Slot] = {}
        self.usable = os.path.isdir(SHM_DIR)

    def acquire(self) -> Slot | None:
        """A free slot, or None (none left, or no shared memory here: send the bytes instead)."""
        if self._free:
            return self._free.pop()
        if not self.usable or len(self._all) >= self.max_slots:
            return None
        path = os.path.join(SHM_DIR, f"{self._prefix}-{next(self._names)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            self.usable = False
            return None
        try:
            os.ftruncate(fd, self.slot_bytes)
            buf = mmap.mmap(fd, self.slot_bytes)
        except OSError:
            os.unlink(path)
            self.usable = False
            return None
        finally:
            os.close(fd)
        slot = Slot(path, self.slot_bytes, buf)
        self._all[path] = slot
        return slot

    def release(self, slot: Slot) -> None:
        """The worker is done with ``slot``: it may carry the next request."""
        if slot.path in self._all:
            self._free.append(slot)

    def retire(self, slot: Slot) -> None:
        """A worker may still read ``slot`` (its call timed out): never reuse it."""
        if self._all.pop(slot.path, None) is not None:
            _drop(slot)

    @property
    def slots(self) -> int:
        return len(self._all)

    def close(self) -> None:
        for slot in self._all.values():
            _drop(slot)
        self._all.clear()
        self._free.clear()


def remove_slots(prefix: str) -> int:
    """Unlink every slot file whose ``SharedSlots`` had ``prefix`` (those of a gateway process that was
    killed before it closed its own); how many."""
    n = 0
    for name in os.listdir(SHM_DIR) if os.path.isdir(SHM_DIR) else ():
        if name.startswith(prefix + "-"):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                n += 1
            except OSError:
                pass
    return n


def _drop(slot: Slot) -> None:
    try:
        os.unlink(slot.path)
    except OSError:
        pass
    try:
        slot.buf.close()
    except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
        pass


class SlotReader:
    """The worker's side: ``SharedSlots`` files mapped once and kept (at most ``keep``, oldest dropped: a
    retired slot's pages stay with the worker until its mapping goes; one still being read when it is
    dropped is closed by its last reader)."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, path: str, length: int) -> memoryview:
        """The first ``length`` bytes of the slot at ``path`` (FileNotFoundError when it is not on this
        machine)."""
        m = self._maps.get(path)
        if m is None:
            if not path.startswith(SHM_DIR + "/") or ".." in path:
                raise ValueError(f"not a gateway slot: {path[:80]}")
            fd = os.open(path, os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            if len(self._maps) >= self.keep:
                old = self._maps.pop(next(iter(self._maps)))
                try:
                    old.close()
                except BufferError:
                    pass
            self._maps[path] = m
        return memoryview(m)[:length]
