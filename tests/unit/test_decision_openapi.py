"""docs/decision-api.yaml is the decision API's contract: a valid OpenAPI document whose schemas are what
gateway/decision/ sends and takes, field for field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.decision.service import OUTCOMES, Allow, Deny, Settled, SettleInput

SPEC = Path(__file__).resolve().parents[2] / "docs" / "decision-api.yaml"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())  # type: ignore[no-any-return]


def schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]  # type: ignore[no-any-return]


def test_the_document_is_valid_openapi(spec: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


ALLOW = Allow(request_id="r1", upstream="sim", upstream_url=None, path="/v1/chat/completions", body=b"{}",
              upstream_headers={"content-type": "application/json"}, remove_headers=("authorization",),
              response_headers={"x-kgate-request-id": "r1"}, stream=True, strip_usage=True,
              rename=((b'"model":"a"', b'"model":"b"'),), model="dense", api="openai.chat", k_max=1.5,
              flops_max=1e12, samples=1, clamped=("max_tokens",), fail_open=False)
DENY = Deny("r2", 429, {"retry-after": "3"}, b'{"error":{}}', "budget_exceeded", True)
SETTLED = Settled("r1", "settled", 10, b"", "allowed", 200, "", {"k": 1.0}, {"x-kgate-k": "1"})


@pytest.mark.parametrize(("name", "obj"), [("Allow", ALLOW), ("Deny", DENY), ("Settled", SETTLED)])
def test_answers_match_their_schemas(spec: dict[str, Any], name: str, obj: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    doc = obj.as_json()
    sch = schema(spec, name)
    assert set(doc) == set(sch["properties"]), "every field sent is documented, every documented one sent"
    jsonschema.validate(doc, sch)


def test_settle_request_fields_are_the_services(spec: dict[str, Any]) -> None:
    documented = set(schema(spec, "SettleRequest")["properties"])
    taken = {f.name for f in dataclasses.fields(SettleInput)} | {"request_id", "data_base64"}
    assert documented == taken
    assert schema(spec, "SettleRequest")["properties"]["outcome"]["enum"] == list(OUTCOMES)
