"""The protocol between the driver and what it sends images to: request and result groups, their wire
form, the worker's counters, and the ``WorkerHandle`` the driver calls.

Plain Python and numpy: no Ray, no framework.  Requests travel in groups (``RequestGroup``: one row per
image: item id, model index, image index) so that one call can carry several images; each image is still
run on its own at batch size 1.  A ``ResultGroup`` has one row per image in ``RESULT_COLS`` order (outcome,
hit, the worker's stage seconds, the input file it ran and what the model answered), error messages for
the images that failed, and the worker's counters (``WorkerState``).  Groups cross process boundaries as
bytes (``to_bytes``/``from_bytes``): Ray passes bytes through as they are, while a numpy array or a
dataclass costs a pickling round of several times the whole call.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cortexbench.ledger import ANSWER_COLUMNS, OUTCOMES, WORKER_STAGES

OK, INPUT_ERROR, MODEL_ERROR, ERROR = (OUTCOMES.index(n) for n in ("ok", "input_error", "model_error", "error"))
N_STAGES = len(WORKER_STAGES)
QUEUE, INPUT, DECODE, WAIT, READ, BUILD, COPY, INFER, FREE = range(N_STAGES)
# Columns of ResultGroup.rows: item, outcome, hit, one per stage, then what the image ran and answered.
RESULT_COLS = ("item", "outcome", "hit", *WORKER_STAGES, *ANSWER_COLUMNS)
N_COLS = len(RESULT_COLS)
STAGE0 = 3  # the first stage column
INPUT_IDX, TOP1, CHECKSUM = (RESULT_COLS.index(c) for c in ANSWER_COLUMNS)


@dataclass(frozen=True)
class RequestGroup:
    """Images for one worker call: ``rows`` is int64 (n, 3): item id, model index, image index."""

    rows: np.ndarray

    @staticmethod
    def of(items: Sequence[int], model_idx: Sequence[int], image_idx: Sequence[int]) -> RequestGroup:
        return RequestGroup(np.column_stack([np.asarray(items, np.int64), np.asarray(model_idx, np.int64),
                                             np.asarray(image_idx, np.int64)]))

    def __len__(self) -> int:
        return len(self.rows)

    def to_bytes(self) -> bytes:
        """The wire form: the rows' int64 bytes (Ray passes bytes without pickling; a numpy array costs
        several times more per call)."""
        return self.rows.astype(np.int64, copy=False).tobytes()

    @staticmethod
    def from_bytes(data: bytes) -> RequestGroup:
        return RequestGroup(np.frombuffer(data, np.int64).reshape(-1, 3))


@dataclass(frozen=True)
class WorkerState:
    """Counters the driver turns into metrics; sent back with every group."""

    loads_total: int = 0
    hits_total: int = 0
    misses_total: int = 0
    model_bytes_read: int = 0
    image_bytes_read: int = 0
    inflight: int = 0
    memory_bytes: int = -1  # GPU memory of this process; -1 on a CPU worker or when it cannot be read
    host_memory_bytes: int = 0  # this process's RSS


@dataclass(frozen=True)
class ResultGroup:
    """What a worker gives back for a group: ``rows`` float64 (n, 3 + stages) in ``RESULT_COLS`` order,
    error messages by row position (failed images only), and the worker's counters."""

    rows: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    state: WorkerState = field(default_factory=WorkerState)

    def __len__(self) -> int:
        return len(self.rows)

    def to_bytes(self) -> bytes:
        """The wire form: a fixed header (rows, error bytes, the state's counters), the float64 rows, then
        the errors pickled (only when there are some)."""
        s = self.state
        return encode_result(len(self.rows), self.rows.astype(np.float64, copy=False).tobytes(), self.errors,
                              (s.loads_total, s.hits_total, s.misses_total, s.model_bytes_read,
                               s.image_bytes_read, s.inflight, s.memory_bytes, s.host_memory_bytes))

    @staticmethod
    def from_bytes(data: bytes) -> ResultGroup:
        n, n_err, *state = RESULT_HEAD.unpack_from(data)
        end = RESULT_HEAD.size + n * N_COLS * 8
        rows = np.frombuffer(data, np.float64, n * N_COLS, RESULT_HEAD.size).reshape(n, N_COLS)
        errors = pickle.loads(data[end:end + n_err]) if n_err else {}
        return ResultGroup(rows, errors, WorkerState(*state))


RESULT_HEAD = struct.Struct("=II8q")
ONE_REQUEST = struct.Struct("=3q")  # one image's request on the wire
ONE_ROW = struct.Struct(f"={N_COLS}d")


def encode_result(n: int, rows: bytes, errors: dict[int, str], counters: tuple[int, ...]) -> bytes:
    err = pickle.dumps(errors, protocol=pickle.HIGHEST_PROTOCOL) if errors else b""
    return RESULT_HEAD.pack(n, len(err), *counters) + rows + err


class WorkerHandle(Protocol):
    """How the driver reaches one worker."""

    name: str

    def submit(self, group: RequestGroup) -> asyncio.Future[tuple[ResultGroup, float]]:
        """Start running a group; never blocks.  The future gives the results and the driver-clock time
        they were received, or fails with WorkerLostError when the worker died (its images may be retried
        elsewhere).  The driver may cancel it (a call timed out, or the run is stopping)."""
        ...

    async def recover(self) -> None:
        """Wait until a lost worker is back and set up again; raise WorkerError if it cannot be."""
        ...

    async def replace(self) -> None:
        """A worker that stopped answering (a call timed out): end it and wait for a fresh one, set up
        (where the target cannot end it, as a remote server, wait until it is ready again)."""
        ...

    async def start(self) -> None:
        """Get ready to send (e.g. compile a graph); called once before the first ``submit``."""
        ...

    async def close(self) -> None:
        """Release what ``start`` took; called once when the driver is done."""
        ...


# A result row's columns after the item, until the image is run: failed, hit unknown, no stage times, no
# input, no answer.
BLANK_ROW = (ERROR, -1.0, *(float("nan"),) * N_STAGES, -1.0, -1.0, float("nan"))


# --- one tensor for one model (the serving gateway, ``cortexbench.serve``) ---------------------------
# The stream sends indices into the worker's own inputs; a gateway sends the input itself, decoded and
# checked by the gateway.  A request: item id, model index, the number of axes, the shape, then the float32
# data.  An answer: the length of a one-row ResultGroup wire form, that form (outcome, stages, answers,
# the worker's counters), then the model's first output row as float32.

TENSOR_HEAD = struct.Struct("=qqq")
_LEN = struct.Struct("=I")


def encode_tensor_request(item: int, model_idx: int, x: np.ndarray) -> bytes:
    """The wire form of one input tensor ``x`` (any shape, batch axis included) for model ``model_idx``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return TENSOR_HEAD.pack(item, model_idx, x.ndim) + struct.pack(f"={x.ndim}q", *x.shape) + x.tobytes()


def tensor_request_size(x: np.ndarray) -> int:
    """The length of ``encode_tensor_request``'s bytes for ``x``."""
    return TENSOR_HEAD.size + 8 * x.ndim + 4 * x.size


def write_tensor_request(buf: memoryview, item: int, model_idx: int, x: np.ndarray) -> int:
    """``encode_tensor_request``'s bytes written into ``buf`` (a writable buffer of at least
    ``tensor_request_size(x)`` bytes; ``x`` converted to float32 on the way, one copy); the length written."""
    start = TENSOR_HEAD.size + 8 * x.ndim
    TENSOR_HEAD.pack_into(buf, 0, item, model_idx, x.ndim)
    struct.pack_into(f"={x.ndim}q", buf, TENSOR_HEAD.size, *x.shape)
    np.frombuffer(buf, np.float32, x.size, start).reshape(x.shape)[...] = x
    return start + 4 * x.size


def decode_tensor_request(data: bytes) -> tuple[int, int, np.ndarray]:
    """(item, model index, the input) of ``encode_tensor_request``'s bytes; the array is read-only."""
    item, model_idx, ndim = TENSOR_HEAD.unpack_from(data)
    shape = struct.unpack_from(f"={ndim}q", data, TENSOR_HEAD.size)
    start = TENSOR_HEAD.size + 8 * ndim
    return item, model_idx, np.frombuffer(data, np.float32, offset=start).reshape(shape)


def encode_tensor_result(result: bytes, output: np.ndarray | None) -> bytes:
    """A one-row ResultGroup's wire form and the model's output row (None when the image failed)."""
    out = b"" if output is None else np.ascontiguousarray(output, dtype=np.float32).reshape(-1).tobytes()
    return _LEN.pack(len(result)) + result + out


def decode_tensor_result(data: bytes) -> tuple[ResultGroup, np.ndarray]:
    """The ResultGroup (one row) and the output row (empty when the image failed)."""
    (n,) = _LEN.unpack_from(data)
    group = ResultGroup.from_bytes(data[_LEN.size:_LEN.size + n])
    return group, np.frombuffer(data, np.float32, offset=_LEN.size + n)
