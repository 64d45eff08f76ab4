"""Open Inference Protocol (v2) bodies for the gateway: plain Python and numpy, no web framework.

``parse_infer`` reads ``POST /v2/models/{name}/infer``: a JSON body (``inputs[0].data``), or the binary
tensor extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then the raw little-endian
tensor of ``inputs[0].parameters.binary_data_size`` bytes).  Every way a body can be wrong is a
``RequestError``: 400 for a body that cannot be read (not JSON, missing or mistyped fields, a header length
or a binary size that does not add up), 422 for one that can be read but does not fit the model (input
name, shape, datatype, element count).  Models run at batch size 1: the shape is ``[1, *input]`` (or the
input's shape without the batch axis).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cortexbench.errors import RequestError

HEADER = "Inference-Header-Content-Length"
# accepted input datatypes (little-endian on the wire); the workers get float32
DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8")}


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its index in the workers' model list, its input and output."""

    name: str
    index: int
    input_shape: tuple[int, ...]
    num_classes: int
    input_name: str = "input"
    output_name: str = "output"

    def metadata(self, platform: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``."""
        return {"name": self.name, "versions": ["1"], "platform": platform,
                "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.input_shape]}],
                "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, self.num_classes]}]}


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: the input as float32 (1, *input_shape), the request's id, and whether
    the answer is to be binary."""

    x: np.ndarray
    id: str | None = None
    binary_output: bool = False


def _bad(msg: str) -> RequestError:
    return RequestError(400, msg)


def _unfit(msg: str) -> RequestError:
    return RequestError(422, msg)


def parse_infer(body: bytes, header_length: str | None, model: ModelInfo) -> InferRequest:
    """Read and check an inference request for ``model`` (see the module docstring)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER} must be an integer, not {header_length[:40]!r}") from None
        if not 0 < n <= len(body):
            raise _bad(f"{HEADER} {n} is outside the body of {len(body)} bytes")
        head_bytes, binary = body[:n], memoryview(body)[n:]
    else:
        head_bytes, binary = body, None
    try:
        head = json.loads(head_bytes)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _bad(f"the body is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(head, dict):
        raise _bad("the body must be a JSON object with 'inputs'")
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        raise _unfit(f"model '{model.name}' takes 1 input ('{model.input_name}'), not {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise _bad("'inputs[0]' must be an object with name, shape, datatype")
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise _bad("'inputs[0]' needs 'name' and 'datatype' strings")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad("'inputs[0].shape' must be a list of integers of 0 or more")
    if name != model.input_name:
        raise _unfit(f"model '{model.name}' has no input '{name[:60]}'; its input is '{model.input_name}'")
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise _unfit(f"input datatype {datatype[:20]} is not supported (valid: {', '.join(DTYPES)})")
    want = [1, *model.input_shape]
    if shape not in (want, list(model.input_shape)):
        raise _unfit(f"input shape {shape[:8]} does not fit model '{model.name}': it takes {want} (batch size 1)")
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'inputs[0].parameters' must be an object")
    if "binary_data_size" in params:
        x = _binary(params, binary, count, dtype, datatype, shape)
    elif binary is not None and len(binary):
        raise _bad(f"the body has {len(binary)} binary bytes but 'inputs[0].parameters' has no binary_data_size")
    else:
        x = _json_data(tensor.get("data"), count, dtype, shape)
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    return InferRequest(x.astype(np.float32, copy=False).reshape(want), request_id, _wants_binary(head))


def _binary(params: dict[str, Any], binary: memoryview | None, count: int, dtype: np.dtype, datatype: str,
            shape: list[int]) -> np.ndarray:
    size = params.get("binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad("'inputs[0].parameters.binary_data_size' must be an integer of 0 or more")
    if binary is None:
        raise _bad(f"binary_data_size is set but there is no binary part: send {HEADER}")
    expected = count * dtype.itemsize
    if size != expected:
        raise _bad(f"binary_data_size {size} does not match shape {shape} of {datatype} ({expected} bytes)")
    if len(binary) != size:
        raise _bad(f"the binary part has {len(binary)} bytes; binary_data_size says {size}")
    return np.frombuffer(binary, dtype, count)


def _json_data(data: Any, count: int, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise _bad("'inputs[0].data' must be a list of numbers (or use the binary tensor extension)")
    try:
        x = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise _unfit("'inputs[0].data' must hold numbers only, nested evenly") from None
    if x.size != count:
        raise _unfit(f"'inputs[0].data' has {x.size} values; shape {shape} needs {count}")
    return x.reshape(-1).astype(dtype)


def _wants_binary(head: dict[str, Any]) -> bool:
    params = head.get("parameters")
    if isinstance(params, dict) and params.get("binary_data_output") is True:
        return True
    outputs = head.get("outputs")
    if isinstance(outputs, list):
        return any(isinstance(o, dict) and isinstance(o.get("parameters"), dict)
                   and o["parameters"].get("binary_data") is True for o in outputs)
    return False


def encode_infer(model: ModelInfo, request: InferRequest, y: np.ndarray,
                 parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """The answer to an inference request: its bytes and headers (content type, and the header length for
    a binary answer).  ``y`` is the model's output row."""
    y = np.ascontiguousarray(y, dtype="<f4").reshape(1, -1)
    out: dict[str, Any] = {"name": model.output_name, "datatype": "FP32", "shape": list(y.shape)}
    head: dict[str, Any] = {"model_name": model.name, "model_version": "1"}
    if request.id is not None:
        head["id"] = request.id
    if parameters:
        head["parameters"] = parameters
    head["outputs"] = [out]
    if request.binary_output:
        raw = y.tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        text = json.dumps(head, separators=(",", ":")).encode()
        return text + raw, {"content-type": "application/octet-stream", HEADER: str(len(text))}
    out["data"] = y.reshape(-1).tolist()
    return json.dumps(head, separators=(",", ":")).encode(), {"content-type": "application/json"}


def top_k(y: np.ndarray, k: int = 5) -> list[dict[str, float]]:
    """The ``k`` highest classes of an output row: class index, softmax score, logit; best first."""
    y = np.asarray(y, np.float64).reshape(-1)
    if y.size == 0:
        return []
    order = np.argsort(-y, kind="stable")[:k]
    e = np.exp(y - y.max())
    p = e / e.sum()
    return [{"class": int(i), "score": float(p[i]), "logit": float(y[i])} for i in order]
