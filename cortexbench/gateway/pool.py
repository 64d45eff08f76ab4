"""``Gateway``: the gateway's side of the workers: who runs a request, how many are in flight, lost workers.

Each inference request is one image for one worker: ``Gateway.infer`` picks a live worker with the
stream's balancer (``balancer.make_balancer``: least-outstanding by default), sends the checked input
whole (``protocol.encode_tensor_request``) and reads the answer (``protocol.decode_tensor_result``: the
outcome, the worker's stage times and the output row).  Back-pressure: ``admit`` refuses a request when
``max_inflight`` are in the gateway already (the app answers 503 with Retry-After), so no queue grows
without bound; each worker runs at most as many calls at once as its actor's threads, and the rest wait
in Ray's queue for that worker, which the bound keeps short.

A worker whose process died (``WorkerLostError``) is taken out of the balancer's choices and recovered in
the background (``TensorCaller.recover``: Ray restarts it and its mode is set again); the request answers
503 at once.  Per image the gateway records the stream's metrics (``metrics.MetricsState``: images by
model, worker and outcome, the latency histogram, the stages, hits and loads): the latency runs from the
request's arrival to the answer; ``transport`` is what the worker did not account for (reading and checking
the body, the call there and back).  They are recorded on the event loop's next turn, once the answer is on
its way, so the client does not wait for the bookkeeping.

``RayCaller`` sends a request for a worker on the gateway's machine through a shared-memory slot
(``gateway.shm``): the call carries the slot's path, not the tensor; and, with ``channel`` (``serve.channel
= "socket"``, the default), the call goes over the worker's direct channel (``gateway.channel``, a Unix
socket into its process) rather than as a Ray actor call.

Plain Python: the workers are reached through a ``TensorCaller`` (``RayCaller`` over ``cluster.RayTarget``,
``LocalCaller`` for ``ModelWorker``s in this process).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cortexbench.balancer import make_balancer
from cortexbench.errors import WorkerError, WorkerLostError
from cortexbench.gateway.channel import INLINE, SLOT, WorkerChannel
from cortexbench.gateway.shm import SharedSlots
from cortexbench.gateway.v2 import ModelInfo
from cortexbench.ledger import OUTCOMES, WORKER_STAGES
from cortexbench.metrics import MetricsState
from cortexbench.metrics_http import RequestCounts
from cortexbench.protocol import (
    OK,
    STAGE0,
    decode_tensor_result,
    encode_tensor_request,
    tensor_request_size,
    write_tensor_request,
)


class TensorCaller(Protocol):
    """How the gateway reaches its workers."""

    names: Sequence[str]

    async def call(self, index: int, item: int, model_idx: int, x: np.ndarray, timeout_s: float) -> bytes:
        """Run input ``x`` (batch 1) of model ``model_idx`` on worker ``index`` as request ``item``: the
        answer's bytes (``protocol.encode_tensor_result``); WorkerLostError when the worker died, WorkerError
        when it did not answer in time."""
        ...

    async def recover(self, index: int) -> None:
        """Wait until a lost worker is back and set up again; WorkerError if it cannot be."""
        ...


class RayCaller:
    """The Ray target's workers (``cluster.RayTarget.infer_tensor``); the mode is set again on recovery.

    With ``slots``, a request for a worker on this machine (``local[index]``) travels in a shared-memory
    slot and the call carries only its path (``gateway.shm``); otherwise, or when no slot is free, its bytes
    go with the call."""

    def __init__(self, target: Any, mode: str, slots: SharedSlots | None = None,
                 local: Sequence[bool] = (), channel: bool = False) -> None:
        self.target = target
        self.mode = mode
        self.names = [w.name for w in target.workers]
        self.slots = slots
        self.local = list(local) or [False] * len(self.names)
        self.channel = channel
        self.channels: list[WorkerChannel | None] = [None] * len(self.names)
        if channel:
            mine = [i for i, here in enumerate(self.local) if here]
            for i, address in zip(mine, target.open_channels(mine), strict=True):
                self.channels[i] = WorkerChannel(address, self.names[i]) if address is not None else None

    async def call(self, index: int, item: int, model_idx: int, x: np.ndarray, timeout_s: float) -> bytes:
        slot = self.slots.acquire() if self.slots is not None and self.local[index] else None
        channel = self.channels[index]
        if slot is None or tensor_request_size(x) > slot.size:
            if slot is not None:
                self.slots.release(slot)  # type: ignore[union-attr]
            data = encode_tensor_request(item, model_idx, x)
            if channel is not None:
                return await channel.call(INLINE, data, timeout_s)
            return await self.target.infer_tensor(index, data, timeout_s)  # type: ignore[no-any-return]
        n = write_tensor_request(memoryview(slot.buf), item, model_idx, x)
        try:
            if channel is not None:
                out = await channel.call(SLOT, f"{slot.path} {n}".encode(), timeout_s)
            else:
                out = await self.target.infer_tensor(index, (slot.path, n), timeout_s)
        except BaseException:
            self.slots.retire(slot)  # type: ignore[union-attr]  # the worker may still read it
            raise
        self.slots.release(slot)  # type: ignore[union-attr]
        return out  # type: ignore[no-any-return]

    def close(self) -> None:
        for channel in self.channels:
            if channel is not None:
                channel.close()
        if self.slots is not None:
            self.slots.close()

    async def recover(self, index: int) -> None:
        await self.target.recover_worker(index, self.mode)
        if self.channels[index] is not None:  # a restarted worker listens anew
            self.channels[index].close()  # type: ignore[union-attr]
            self.channels[index] = None  # the actor call, until (unless) the new channel opens
            loop = asyncio.get_running_loop()
            try:
                address = (await loop.run_in_executor(None, self.target.open_channels, [index]))[0]
            except Exception:
                return
            self.channels[index] = WorkerChannel(address, self.names[index]) if address is not None else None


class LocalCaller:
    """``ModelWorker``s in this process, each call on a thread (tests, and a gateway without Ray)."""

    def __init__(self, workers: Sequence[Any], threads: int = 16) -> None:
        self.workers = list(workers)
        self.names = [w.spec.name for w in self.workers]
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gateway-call")

    async def call(self, index: int, item: int, model_idx: int, x: np.ndarray, timeout_s: float) -> bytes:
        loop = asyncio.get_running_loop()
        data = encode_tensor_request(item, model_idx, x)
        fut = loop.run_in_executor(self._pool, self.workers[index].run_tensor, data)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise WorkerError(f"worker {self.names[index]} did not answer within {timeout_s:g} s") from None

    async def recover(self, index: int) -> None:
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class Answer:
    """A request's answer: the output row, the worker that ran it, its result row (``RESULT_COLS``)."""

    output: np.ndarray
    worker: str
    row: np.ndarray


class ModelFailed(WorkerError):
    """The worker ran the request and the model failed (a framework error, a model file that does not load)."""


class Gateway:
    """See the module docstring.  Used from one event loop."""

    def __init__(self, caller: TensorCaller, models: Sequence[ModelInfo], *, mode: str, balancer: str = "least-outstanding",
                 max_inflight: int = 256, call_timeout_s: float = 60.0, seed: int = 0, host: str = "") -> None:
        self.caller = caller
        self.models = {m.name: m for m in models}
        self.mode = mode
        self.max_inflight = max_inflight
        self.call_timeout_s = call_timeout_s
        n = len(caller.names)
        lru = int(mode.partition(":")[2]) if mode.startswith("lru:") else None
        self.balancer = make_balancer(balancer, n, len(models), seed, lru)
        self.outstanding = [0] * n
        self.alive = [True] * n
        self.ready = False  # set once the workers are up and in their mode
        self.metrics = MetricsState(mode=mode, host=host, phase="measuring")
        self.requests = RequestCounts()
        self.accepted = 0  # HTTP requests the app began
        self.answered = 0  # HTTP requests whose answer was sent whole
        self._items = itertools.count()
        self._recovering: dict[int, asyncio.Task[None]] = {}

    @property
    def inflight(self) -> int:
        return self.requests.inflight

    def admit(self) -> bool:
        """Take a slot for an inference request; False when ``max_inflight`` are in flight (answer 503)."""
        if self.requests.inflight >= self.max_inflight:
            return False
        self.requests.inflight += 1
        return True

    def release(self) -> None:
        self.requests.inflight -= 1

    async def infer(self, model: ModelInfo, x: np.ndarray, arrived: float) -> Answer:
        """Run ``x`` (float32, batch 1) on a live worker; ``arrived``: the request's ``time.perf_counter``.
        WorkerLostError / WorkerError when no worker could run it, ModelFailed when the model failed."""
        i = self.balancer.pick(model.index, self.outstanding, self.alive)  # WorkerError if none is alive
        name = self.caller.names[i]
        self.outstanding[i] += 1
        try:
            data = await self.caller.call(i, next(self._items), model.index, x, self.call_timeout_s)
        except WorkerLostError:
            self._lost(i)
            self.metrics.record_group(self.mode, model.name, name, [np.nan], "worker_died")
            raise
        except WorkerError:
            self.metrics.record_group(self.mode, model.name, name, [np.nan], "timeout")
            raise
        except Exception as e:  # anything else from the call (a Ray task error): the worker failed
            self.metrics.record_group(self.mode, model.name, name, [np.nan], "error")
            raise WorkerError(f"worker {name}: {type(e).__name__}: {str(e).strip()[:200]}") from None
        finally:
            self.outstanding[i] -= 1
        group, y = decode_tensor_result(data)
        row = group.rows[0]
        outcome = int(row[1])
        latency = time.perf_counter() - arrived
        # the metrics after the answer is sent, not before (0.15-0.27 ms a request on the 2-core machine)
        asyncio.get_running_loop().call_soon(self._record, model.name, name, row, outcome, latency, group.state)
        if outcome != OK:
            raise ModelFailed(f"model '{model.name}' on {name}: {group.errors.get(0, OUTCOMES[outcome])}")
        return Answer(y, name, row)

    def _record(self, model: str, worker: str, row: np.ndarray, outcome: int, latency: float, state: Any) -> None:
        m = self.metrics
        m.record_group(self.mode, model, worker, [latency], OUTCOMES[outcome])
        if outcome == OK:
            stages = row[STAGE0:STAGE0 + len(WORKER_STAGES)]
            m.record_stages(self.mode, {**{s: [v] for s, v in zip(WORKER_STAGES, stages.tolist(), strict=True)},
                                        "transport": [max(0.0, latency - float(np.nansum(stages)))]})
        hit = int(row[2])
        if hit == 1:
            m.add_cache_hits(worker, mode=self.mode)
        elif hit == 0:
            m.add_model_loads(worker, mode=self.mode)
        m.set_inflight(worker, state.inflight)
        if state.memory_bytes >= 0:
            m.set_device_memory(worker, state.memory_bytes)
        m.set_host_memory(worker, state.host_memory_bytes)

    def _lost(self, i: int) -> None:
        self.alive[i] = False
        if i not in self._recovering:
            self._recovering[i] = asyncio.ensure_future(self._recover(i))

    async def _recover(self, i: int) -> None:
        try:
            await self.caller.recover(i)
            self.alive[i] = True
        except WorkerError:
            pass  # dead for good: it stays out of the choices
        finally:
            self._recovering.pop(i, None)

    def live_workers(self) -> int:
        return sum(self.alive)
