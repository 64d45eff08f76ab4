"""schemathesis over the gateway's generated OpenAPI schema, against a real uvicorn server on 127.0.0.1
(a fake worker that answers at once): no 5xx, and every answer fits the schema.  Bounded examples."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from cortexbench.gateway.app import make_app  # noqa: E402
from tests.gateway_server import serving  # noqa: E402
from tests.test_serve import FakeCaller, _gateway  # noqa: E402


@pytest.mark.timeout(300)
def test_no_5xx_and_answers_fit_the_schema():
    checked = []
    with serving(make_app(_gateway(FakeCaller()), max_body_bytes=1 << 16)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for result in schema.get_all_operations():
            op = result.ok()

            @given(case=op.as_strategy())
            @settings(max_examples=25, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            def check(case) -> None:
                case.call_and_validate(timeout=10)

            check()
            checked.append(op.label)
    assert "POST /v2/models/{name}/infer" in checked and "POST /v1/models/{name}:predict" in checked
