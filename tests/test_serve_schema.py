"""schemathesis over the gateway's generated OpenAPI schema, against a real uvicorn server on 127.0.0.1
(a fake worker that answers at once): no 5xx, every answer fits the schema and is a status the operation
documents, and a request that fits the schema is never turned away as unreadable (400) when it is JSON.

What the schema cannot say: a model's input name, shape and the byte count of a binary tensor are per
model, so a schema-valid request may still not fit the model: that answer is 422, which the positive-data
check is told to accept.  A binary body (``application/octet-stream``, an image) is opaque to the schema,
so random bytes there may be 400.  Generation is derandomised, so CI sees the same examples every run."""

from __future__ import annotations

import json
import math

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

from cortexbench.gateway.app import make_app  # noqa: E402
from tests.gateway_server import serving  # noqa: E402
from tests.test_serve import FakeCaller, _gateway  # noqa: E402

# 401 no token, 404 unknown model, 413 too large, 422 does not fit the model, 503 workers busy
ACCEPTED = ["2xx", "401", "404", "413", "422", "503"]


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}}})


def _json_is_never_unreadable(case, response) -> None:
    if response.status_code == 400 and case.media_type == "application/json":
        raise AssertionError(f"schema-valid JSON answered 400 {response.text[:200]}: "
                             f"the schema and the parser disagree ({json.dumps(case.body)[:300]})")


@pytest.mark.timeout(300)
def test_no_5xx_and_answers_fit_the_schema():
    checked = []
    with serving(make_app(_gateway(FakeCaller()), max_body_bytes=1 << 16)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=_config())
        for result in schema.get_all_operations():
            op = result.ok()

            @given(case=op.as_strategy())
            @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            def check(case) -> None:
                response = case.call_and_validate(timeout=10)
                _json_is_never_unreadable(case, response)

            check()
            checked.append(op.label)
    assert "POST /v2/models/{name}/infer" in checked and "POST /v1/models/{name}:predict" in checked


def _infer_body_schema() -> dict:
    app = make_app(_gateway(FakeCaller()))
    while not hasattr(app, "openapi"):  # under the ASGI middleware
        app = app.app
    spec = app.openapi()
    body = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return body


def _valid_body() -> dict:
    from tests.test_serve import _infos

    model = _infos()[0]
    shape = [1, *model.input_shape]
    return {"id": "a", "inputs": [{"name": model.input_name, "shape": shape, "datatype": "FP32",
                                   "data": [0.0] * math.prod(shape)}]}


def _no_inputs(b):
    b["inputs"] = []


def _negative_dim(b):
    b["inputs"][0]["shape"][0] = -1


def _parameters_not_object(b):
    b["inputs"][0]["parameters"] = 5


def _data_not_list(b):
    b["inputs"][0]["data"] = 0


def _datatype_not_string(b):
    b["inputs"][0]["datatype"] = 3


def _id_not_string(b):
    b["id"] = 7


def _input_not_object(b):
    b["inputs"] = [7]


@pytest.mark.parametrize("spoil", [_no_inputs, _negative_dim, _parameters_not_object, _data_not_list,
                                   _datatype_not_string, _id_not_string, _input_not_object],
                         ids=lambda f: f.__name__.strip("_"))
def test_what_the_parser_calls_unreadable_the_schema_rejects_too(spoil):
    """The deterministic twin of the fuzzing above: a valid body passes both the parser and the published
    schema; each spoilt copy the parser answers 400 must also be outside the schema (otherwise a client
    built from the schema gets a 400)."""
    import jsonschema

    from cortexbench.errors import RequestError
    from cortexbench.gateway.v2 import parse_infer
    from tests.test_serve import _infos

    schema, model = _infer_body_schema(), _infos()[0]
    body = _valid_body()
    jsonschema.validate(body, schema)
    parse_infer(json.dumps(body).encode(), None, model)
    spoil(body)
    with pytest.raises(RequestError) as got:
        parse_infer(json.dumps(body).encode(), None, model)
    assert got.value.status == 400, got.value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, schema)
