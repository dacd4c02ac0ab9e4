"""Schemathesis against the gateway's own /openapi.json, in process (ASGI) with the scripted
scheduler behind it: no 5xx, and every status, content type, header and body matches the schema.

The fast variant bounds the examples per operation; ``--run-slow`` runs many more.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from services.gateway.engine_client import EngineClient
from services.gateway.openapi import openapi_schema
from services.gateway.server import build_app
from tests.fake_scheduler import FakeScheduler, gateway_tokenizer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

pytestmark = pytest.mark.timeout(600)


# Built at import: schemathesis.pytest.from_fixture does not work with pytest 9. The scripted
# scheduler is a thread on a private ipc:// socket, closed when the module's tests are done.
FAKE = FakeScheduler(gateway_tokenizer(), reply="Fuzzed reply.")
APP = build_app(EngineClient(FAKE.addr), gateway_tokenizer(), "smol-test", max_model_len=256)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _close_fake():
    yield
    FAKE.close()


def test_the_app_serves_this_document():
    assert schema.raw_schema == openapi_schema()


def _suppress():
    return [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=_suppress(), database=None)
def test_api_matches_its_schema(case):
    case.call_and_validate(base_url="http://testserver", checks=CHECKS)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=500, deadline=None, suppress_health_check=_suppress(), database=None)
def test_api_matches_its_schema_many_examples(case):
    case.call_and_validate(base_url="http://testserver", checks=CHECKS)
