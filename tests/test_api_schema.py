"""Schemathesis over the whole OpenAPI schema of a real `slam serve`: no input gives a 5xx.

200 examples per operation, and no cap on `max_tokens` but the server's own limit: the model's trained length,
the default of --max-model-len. The server runs the tiny random Llama (64 trained positions, real tokenizer):
this is about the API, and its steps are fast enough for thousands of fuzzed requests.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
import schemathesis_hooks  # noqa: F401  (registers the hooks)
from api_fixtures import BUDGET, RECENT, SINK, running_server
from hypothesis import HealthCheck, Phase, given, settings

EXAMPLES = int(os.environ.get("SLAM_SCHEMA_EXAMPLES", 200))
SCHEMA_SERVER_ARGS = ["--budget", str(BUDGET), "--sink", str(SINK), "--recent", str(RECENT), "--max-n", "2",
                      "--max-batch", "8", "--max-queue", "8", "--served-model-name", schemathesis_hooks.SERVED_MODEL]
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
              ("GET", "/v1/models"), ("GET", "/v1/requests/{request_id}"), ("GET", "/v1/requests/{request_id}/stream"),
              ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_dir):
    with running_server(*SCHEMA_SERVER_ARGS, "--model", str(tiny_dir), log=tmp_path_factory.mktemp("schema") / "serve.log") as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_input_gives_a_server_error(api_schema, method, path):
    operation = api_schema[path][method]
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], derandomize=True, database=None)
    @given(case=operation.as_strategy())
    def check(case) -> None:
        response = case.call(timeout=120)
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"

    check()
    if path in schemathesis_hooks.GENERATION_PATHS:  # fuzzing reached the engine, not only the validation
        assert statuses.count(200) >= 10, sorted(statuses)
