"""Hostile input (issue 6, item 4): the gateway under bodies, headers, paths and clients built to break it.

A hypothesis-driven route fuzzer (an OpenAPI fuzzer would need a schema for five provider APIs whose
interesting cases are exactly the ones a schema does not describe). Every client route is fuzzed:
/v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, Gemini :generateContent and
:streamGenerateContent, and GET /v1/models. The invariants, checked on every example:

- never a 5xx from the gateway itself;
- every error in the client API's shape (OpenAI ``{"error":{message,type,param,code}}``, Anthropic
  ``{"type":"error","error":{type,message}}``, Gemini ``{"error":{code,message,status}}``), and short:
  an error never echoes a huge input back;
- a refused request reaches nothing: the simulator's request count is unchanged, and the principal's
  ledger shows nothing used and nothing held;
- memory stays bounded over thousands of bad requests.

Requests the HTTP parser itself refuses (CR/LF or NUL in a header value, an unknown method) never reach
the application: aiohttp answers them with a plain-text 400, which is checked for status only.

The gateway runs in a background event loop (one for the module) so hypothesis can drive it from plain
synchronous tests; it talks to a real Redis and the in-process simulator.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import posixpath
import threading
import time
import zlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import aiohttp
import orjson
import pytest
import yaml
from gatewayutil import RunningGateway, policy_dict, running_gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.adapters.base import MAX_INT
from gateway.ledger.ledger import BudgetSpec, ScopeRef
from gateway.ledger.redis_server import RedisServer
from gateway.policy.config import load_config
from gateway.proxy.context import Gateway

T = TypeVar("T")

MAX_BODY = 256 * 1024  # the fuzz gateway's body limit: room for 100k levels of '[' under it
KEYS = {"fuzzer": "fuzz-key-reject", "clamper": "fuzz-key-clamp", "roamer": "fuzz-key-roam"}
BIG = 1e30
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz_policy(store_url: str, data_dir: Path) -> dict[str, Any]:
    """The e2e test policy plus fuzz tiers whose budgets cover every metric (huge amounts reach Lua)."""
    policy = policy_dict(store_url, data_dir, server={"max_body_bytes": MAX_BODY})
    budgets = [{"metric": m, "window": "30d", "limit": BIG}
               for m in ("requests", "prompt_tokens", "generated_tokens", "flops", "k_units")]
    policy["tiers"]["fuzz"] = {"models": "*", "max_k": 8, "max_samples": 4, "on_exceed": "reject",
                               "budgets": budgets,
                               # beta headers and the deep-nesting test's "extra" field may pass
                               "allow_fields": ["anthropic-beta", "openai-beta", "extra"],
                               # per-request holds: the test asserts that no request leaves one behind,
                               # which a budget slice (a hold too) would blur
                               "leases": False}
    policy["tiers"]["fuzzclamp"] = {"models": "*", "max_k": 4, "max_samples": 2, "on_exceed": "clamp",
                                    "efforts": ["none", "minimal", "low", "medium"], "budgets": budgets}
    import hashlib

    for pid, tier in (("fuzzer", "fuzz"), ("clamper", "fuzzclamp"), ("roamer", "fuzz")):
        policy["principals"].append({"id": pid, "org": "fuzz", "tier": tier,
                                     "key_sha256": hashlib.sha256(KEYS[pid].encode()).hexdigest()})
    return policy


# ------------------------------------------------------------------------------------------- harness
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Harness:
    """A gateway on a background event loop, driven from synchronous (hypothesis) tests."""

    def __init__(self, store_url: str, data_dir: Path):
        path = data_dir / "policy.yaml"
        path.write_text(yaml.safe_dump(fuzz_policy(store_url, data_dir / "data")))
        self.config = load_config(path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-gateway", daemon=True)
        self.thread.start()
        self._cm = running_gateway(self.config)
        self.g: RunningGateway = self.run(self._cm.__aenter__())
        self.session: aiohttp.ClientSession = self.run(self._session())
        self.host, port = self.g.url.removeprefix("http://").split(":")
        self.port = int(port)

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.session.close())
        self.run(self._cm.__aexit__(None, None, None))
        self.run(_cancel_the_rest())  # handlers of connections the fuzzing left half-open
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def gw(self) -> Gateway:
        return self.g.gw

    # ---------------------------------------------------------------- requests (run on the loop)
    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Reply:
        """``path`` is sent as given (already percent-encoded), never normalised by the client."""
        url = URL(self.g.url + path, encoded=True)
        async with self.session.request(method, url, data=body, headers=headers or {},
                                         allow_redirects=False) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())

    async def raw(self, data: bytes, *, timeout: float = 10) -> Reply:
        """One HTTP/1.1 exchange over a raw socket (for what no client library would send)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            return await _read_rest(reader, head, timeout)
        finally:
            writer.close()

    async def sim_total(self) -> int:
        async with self.session.get(self.g.sim_url + "/_sim/stats") as r:
            return int((await r.json())["requests_total"])

    async def sim_last(self) -> dict[str, Any]:
        async with self.session.get(self.g.sim_url + "/_sim/stats") as r:
            return dict((await r.json())["last_request"] or {})

    async def ledger(self, principal: str) -> tuple[float, float]:
        """(used, held) summed over the principal's budgets."""
        assert self.gw.ledger is not None
        tier = self.config.tiers[next(p.tier for p in self.config.principals if p.id == principal)]
        states = await self.gw.ledger.state(ScopeRef("principal", principal),
                                            [BudgetSpec.from_config(b) for b in tier.budgets])
        return sum(s.used for s in states), sum(s.held for s in states)


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _read_rest(reader: asyncio.StreamReader, head: bytes, timeout: float) -> Reply:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    else:
        body = await asyncio.wait_for(reader.read(), timeout)
    return Reply(status, headers, body)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    server = RedisServer(port=0, appendonly=False)
    server.start_sync()
    h = Harness(server.url, tmp_path_factory.mktemp("fuzz"))
    try:
        yield h
    finally:
        h.close()
        server.stop_sync()
        server.cleanup()


# ------------------------------------------------------------------------------------- the invariants
def assert_error_shape(reply: Reply, shape: str, *alternatives: str) -> None:
    """A gateway error: 4xx, JSON in the API's own error shape (or one of ``alternatives``), short."""
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    assert len(reply.body) < 4096, f"an error of {len(reply.body)} bytes: input echoed back?"
    doc = reply.json()
    if alternatives:
        shape = next((s for s in (shape, *alternatives) if _looks_like(doc, s)), shape)
    if shape == "anthropic":
        assert doc["type"] == "error" and set(doc) <= {"type", "error", "request_id"}, doc
        err = doc["error"]
        assert set(err) == {"type", "message"}, doc
        assert isinstance(err["type"], str) and isinstance(err["message"], str)
    elif shape == "gemini":
        assert set(doc) == {"error"}, doc
        err = doc["error"]
        assert set(err) == {"code", "message", "status"}, doc
        assert err["code"] == reply.status and isinstance(err["message"], str) and isinstance(err["status"], str)
    else:
        assert set(doc) == {"error"}, doc
        err = doc["error"]
        assert set(err) == {"message", "type", "param", "code"}, doc
        assert isinstance(err["message"], str) and isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        assert err["code"] is None or isinstance(err["code"], str)


def _looks_like(doc: Any, shape: str) -> bool:
    if shape == "anthropic":
        return isinstance(doc, dict) and doc.get("type") == "error"
    if shape == "gemini":
        return isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "status" in doc["error"]
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict) and "type" in doc["error"]


def shape_of(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta/"):
        return "gemini"
    return "openai"


class Untouched:
    """Asserts that what happens inside reached no upstream and charged ``principal`` nothing."""

    def __init__(self, h: Harness, principal: str | None = None):
        self.h, self.principal = h, principal

    def __enter__(self) -> Untouched:
        self.before = self.h.run(self.h.sim_total())
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        if et is not None:
            return
        assert self.h.run(self.h.sim_total()) == self.before, "a refused request reached the upstream"
        if self.principal is not None:
            used, held = self.h.run(self.h.ledger(self.principal))
            assert (used, held) == (0, 0), f"a refused request was charged: used {used}, held {held}"


# --------------------------------------------------------------------------------------------- routes
MSG = [{"role": "user", "content": "hi"}]
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 8}}


@dataclass(frozen=True)
class Route:
    path: str
    shape: str
    auth: str  # the header the client API sends its key in
    template: dict[str, Any]
    # (field path, kind) for the fields a hostile value goes into
    fields: tuple[tuple[tuple[str, ...], str], ...]


ROUTES = (
    Route("/v1/chat/completions", "openai", "authorization",
          {"model": "dense", "messages": MSG, "max_tokens": 8},
          ((("model",), "model"), (("messages",), "nonempty_list"), (("n",), "n"), (("max_tokens",), "cap"),
           (("max_completion_tokens",), "cap"), (("best_of",), "cap"), (("stream",), "bool"),
           (("use_beam_search",), "bool"), (("stream_options",), "obj"),
           (("stream_options", "include_usage"), "bool"), (("reasoning_effort",), "enum"),
           (("thinking",), "obj"), (("chat_template_kwargs",), "obj"))),
    Route("/v1/completions", "openai", "authorization",
          {"model": "dense", "prompt": "hi", "max_tokens": 8},
          ((("model",), "model"), (("prompt",), "prompt"), (("n",), "n"), (("best_of",), "cap"),
           (("max_tokens",), "cap"), (("stream",), "bool"), (("stream_options",), "obj"),
           (("reasoning_effort",), "enum"))),
    Route("/v1/responses", "openai", "authorization",
          {"model": "dense", "input": "hi", "max_output_tokens": 16},
          ((("model",), "model"), (("input",), "input"), (("max_output_tokens",), "cap16"),
           (("stream",), "bool"), (("reasoning",), "obj"), (("reasoning", "effort"), "enum"))),
    Route("/v1/messages", "anthropic", "x-api-key",
          {"model": "reasoner", "max_tokens": 1500, "messages": MSG},
          ((("model",), "model"), (("max_tokens",), "cap"), (("messages",), "list"), (("stream",), "bool"),
           (("thinking",), "obj"), (("thinking", "type"), "enum"), (("thinking", "budget_tokens"), "thinking"),
           (("output_config",), "obj"), (("output_config", "effort"), "enum"))),
    Route("/v1beta/models/dense:generateContent", "gemini", "x-goog-api-key", GEMINI_BODY,
          ((("contents",), "list"), (("generationConfig",), "obj"),
           (("generationConfig", "candidateCount"), "cap"), (("generationConfig", "maxOutputTokens"), "cap"),
           (("generationConfig", "thinkingConfig"), "obj"),
           (("generationConfig", "thinkingConfig", "thinkingBudget"), "gemini_budget"),
           (("generationConfig", "thinkingConfig", "thinkingLevel"), "enum"))),
    Route("/v1beta/models/reasoner:streamGenerateContent", "gemini", "x-goog-api-key", GEMINI_BODY,
          ((("contents",), "list"), (("generationConfig",), "obj"),
           (("generationConfig", "candidateCount"), "cap"), (("generationConfig", "maxOutputTokens"), "cap"),
           (("generationConfig", "thinkingConfig", "thinkingBudget"), "gemini_budget"))),
)


def auth_headers(route: Route, principal: str) -> dict[str, str]:
    key = KEYS[principal]
    if route.auth == "authorization":
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    extra = {"anthropic-version": "2023-06-01"} if route.shape == "anthropic" else {}
    return {route.auth: key, "Content-Type": "application/json", **extra}


# ----------------------------------------------------------------------------------- value strategies
I64, U64 = -(2**63), 2**64 - 1  # the integers JSON (as orjson writes it) can carry
ints = st.integers(min_value=I64, max_value=U64)
finite = st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither; orjson writes them as null
json_scalars = st.one_of(st.none(), st.booleans(), ints, finite, st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)
small_lists = st.lists(json_scalars, max_size=3)
small_dicts = st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)

huge_numbers = st.sampled_from([10**9, 10**12, 2**53, 2**63 - 1, 2**64 - 1, 1e16, 1e300, 1.7976931348623157e308,
                                -(10**9), -(2**63), -1e308])
not_numbers = st.one_of(st.text(max_size=20), st.booleans(), small_lists, small_dicts)
fractions = finite.filter(lambda x: not x.is_integer())
non_positive = st.integers(min_value=I64, max_value=0)
not_objects = st.one_of(st.text(max_size=20), st.booleans(), ints, finite, small_lists)
not_strings = st.one_of(st.booleans(), ints, finite, small_lists, small_dicts)
not_bools = st.one_of(st.text(max_size=20), ints, finite, small_lists, small_dicts)
bad_enum = st.one_of(not_strings, st.text(max_size=30).filter(
    lambda s: s.lower() not in ("none", "minimal", "low", "medium", "high", "xhigh", "max", "enabled", "adaptive",
                                "disabled")))
# Model names: unknown, empty, URL-like and traversal-like, very long, odd characters.
bad_model_names = st.one_of(
    st.sampled_from(["", "ghost", "DENSE", "dense ", " dense", "dense\x00", "../dense", "dense/../reasoner",
                     "http://evil.example/v1", "https://127.0.0.1:1/x", "//evil.example/x", "dense@evil.example",
                     "file:///etc/passwd", "models/../../admin", "%2e%2e%2fdense", "dense?key=x", "dense#x",
                     "x" * 100_000, "\u202edense", "d\u00e9nse", "\U0001f600"]),
    st.text(max_size=64).filter(lambda s: s not in ("dense", "reasoner", "moe")))


def below(limit: int) -> st.SearchStrategy[Any]:
    """Integers below ``limit``, and huge numbers either past 2^53 or below ``limit``."""
    return st.one_of(st.integers(min_value=I64, max_value=limit - 1),
                     huge_numbers.filter(lambda x: abs(x) > MAX_INT or x < limit))


BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(not_strings, bad_model_names),
    "n": st.one_of(below(1), st.integers(min_value=129, max_value=U64), huge_numbers.filter(lambda x: x > 128),
                   fractions, not_numbers),
    "cap": st.one_of(below(1), fractions, not_numbers),
    "cap16": st.one_of(below(16), fractions, not_numbers),
    "thinking": st.one_of(below(1024), fractions, not_numbers),
    "gemini_budget": st.one_of(below(-1), fractions, not_numbers),
    "bool": not_bools,
    "obj": not_objects,
    "enum": bad_enum,
    "list": st.one_of(st.text(max_size=10), ints, st.booleans(), small_dicts),
    "nonempty_list": st.one_of(st.just([]), st.text(max_size=10), ints, st.booleans(), small_dicts),
    "prompt": st.one_of(st.just([]), ints, st.booleans(), finite, small_dicts.filter(bool),
                        st.lists(st.one_of(st.booleans(), finite, st.none()), min_size=1, max_size=3),
                        st.just([[]]), st.just(["a", 1]), st.just([[1], "a"]), st.just([-1])),
    "input": st.one_of(ints, st.booleans(), finite, small_dicts),
}


def put(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``body`` with ``value`` at ``path`` (intermediate objects created as needed)."""
    out = orjson.loads(orjson.dumps(body))
    node = out
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return out


@st.composite
def hostile_field(draw: st.DrawFn) -> tuple[Route, str, dict[str, Any]]:
    """A valid request with one field made invalid: wrong type, out of range, huge, negative, unknown."""
    route = draw(st.sampled_from(ROUTES))
    principal = draw(st.sampled_from(["fuzzer", "clamper"]))
    path, kind = draw(st.sampled_from(route.fields))
    body = dict(route.template)
    if draw(st.booleans()) and "stream" in {p[0] for p, _ in route.fields}:
        body["stream"] = True
    if route.shape == "anthropic" and path[:1] == ("thinking",) and path != ("thinking",):
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    return route, principal, put(body, path, draw(BAD_VALUES[kind]))


# ------------------------------------------------------------------------------------------ properties
@FUZZ
@given(case=hostile_field())
def test_hostile_field_values_are_refused_in_shape_and_never_forwarded(harness: Harness,
                                                                       case: tuple[Route, str, dict[str, Any]]) -> None:
    route, principal, body = case
    with Untouched(harness, principal):
        reply = harness.run(harness.request("POST", route.path, orjson.dumps(body), auth_headers(route, principal)))
        assert_error_shape(reply, route.shape)
        assert reply.status in (400, 403, 404), (reply.status, reply.body[:300], body)


@FUZZ
@given(route=st.sampled_from(ROUTES), value=json_values, merge=st.booleans())
def test_arbitrary_json_never_a_5xx(harness: Harness, route: Route, value: Any, merge: bool) -> None:
    """Any JSON at all, alone or merged over a valid body: a clean answer, never a 5xx; what is accepted
    is forwarded once and its hold is settled."""
    body = {**route.template, **value} if merge and isinstance(value, dict) else value
    before = harness.run(harness.sim_total())
    reply = harness.run(harness.request("POST", route.path, orjson.dumps(body), auth_headers(route, "roamer")))
    assert reply.status < 500, (reply.status, reply.body[:300], body)
    after = harness.run(harness.sim_total())
    if reply.status >= 400:
        assert_error_shape(reply, route.shape)  # the gateway's own, or the upstream's passed on
        assert after - before in (0, 1), (reply.status, body)
    else:
        assert after == before + 1
    assert harness.run(harness.ledger("roamer"))[1] == 0, "a hold was left behind"


NOT_JSON = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"", b" ", b"{", b"}", b"[", b"null", b"true", b"1", b'"s"', b"[]", b'{"model": "dense",}',
                     b"NaN", b'{"n": NaN}', b'{"n": Infinity}', b'{"n": 1e400}', b'{"n": -1e400}',
                     b"\xef\xbb\xbf{}", b'{"model": "\xff\xfe"}', b'{"model": "\\ud800"}',
                     b'{"model": "dense"} trailing', b'{"model": "dense"}{"model": "dense"}',
                     b"\x00" * 64, b'{"a":' * 50, b"'single'", b"{'model': 'dense'}", b"\x1f\x8b\x08\x00"]),
    st.text(max_size=100).map(lambda s: s.encode("utf-16")),
)


@FUZZ
@given(route=st.sampled_from(ROUTES), raw=NOT_JSON, content_type=st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1", ""]))
def test_bodies_that_are_not_json_objects_are_400(harness: Harness, route: Route, raw: bytes,
                                                   content_type: str) -> None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        return  # a JSON object (possibly valid): the arbitrary-JSON property covers it
    headers = {**auth_headers(route, "fuzzer"), "Content-Type": content_type}
    with Untouched(harness, "fuzzer"):
        reply = harness.run(harness.request("POST", route.path, raw, headers))
        assert_error_shape(reply, route.shape)
        assert reply.status == 400, (reply.status, reply.body[:200])


# Paths: fragments of real routes, traversal, absolute URLs, userinfo, encodings, odd characters.
path_parts = st.one_of(
    st.sampled_from(["v1", "v1beta", "models", "chat", "completions", "responses", "messages", "dense",
                     "dense:generateContent", "dense:streamGenerateContent", ":generateContent", "..", ".", "",
                     "%2e%2e", "%2F", "%00", "%ff", "%c0%af", "@evil.example", "evil.example:80",
                     "http:", "https:%2F%2Fevil.example", "admin", "_sim", "stats", "metrics", "~", ";x=1",
                     "dense@evil.example:generateContent", "..%2F..%2Fadmin:generateContent",
                     "http%3A%2F%2Fevil.example%2F:generateContent"]),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
)
hostile_paths = st.one_of(
    st.lists(path_parts, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["/", "//", "//evil.example/v1/chat/completions", "/v1/chat/completions/",
                     "/v1/chat/completions/..", "/v1/./chat/completions/x", "/v1/messages/count_tokens",
                     "/v1/messages/../chat/completions", "/v1beta/models/", "/v1beta/models/:generateContent",
                     "/v1beta/models/dense", "/v1beta/models/dense:", "/v1beta/models/dense:countTokens",
                     "/v1beta/models/dense:generateContent/x", "/v1beta/models/a/b:generateContent",
                     "/v1beta/models/%2e%2e%2f%2e%2e%2fadmin:generateContent",
                     "/v1beta/models/http:%2F%2Fevil.example%2Fx:generateContent",
                     "/V1/CHAT/COMPLETIONS", "/v1/models/dense", "/_sim/stats", "/admin/keys",
                     "/v1beta/models/dense:generateContent;x"]),
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
GET_PATHS = ("/v1/models", "/healthz", "/readyz", "/metrics")
GHOST_CHAT = orjson.dumps({**ROUTES[0].template, "model": "ghost"})  # valid nowhere: no route forwards it


@FUZZ
@given(method=methods, path=hostile_paths, body=st.one_of(st.just(b""), st.binary(max_size=64), st.just(GHOST_CHAT)))
def test_unknown_paths_and_methods(harness: Harness, method: str, path: str, body: bytes) -> None:
    """Whatever the path and method: never a 5xx, errors in the shape of the path's API, nothing forwarded
    (the body is never a valid request for any route)."""
    headers = {"Authorization": f"Bearer {KEYS['fuzzer']}", "x-api-key": KEYS["fuzzer"]}
    with Untouched(harness, "fuzzer"):
        reply = harness.run(harness.request(method, path, body if method != "GET" else None, headers))
        assert reply.status < 500, (method, path, reply.status, reply.body[:200])
        if reply.status == 404 and reply.body == b"404: Not Found" and any(c in unquote(path) for c in "\r\n"):
            return  # a known gap, pinned by test_paths_with_line_breaks_are_answered_in_shape
        if reply.status < 400:
            assert method in ("GET", "HEAD") and _normal(path) in GET_PATHS, (method, path, reply.status)
        elif method != "HEAD":
            assert_error_shape(reply, shape_of(path), shape_of(unquote(path)))


def test_paths_with_line_breaks_are_answered_in_shape(harness: Harness) -> None:
    for path in ("/%0A", "/v1/chat/completions%0A", "/v1/messages/%0D%0Ax", "/v1beta/models/%0A:generateContent"):
        reply = harness.run(harness.request("GET", path))
        assert_error_shape(reply, shape_of(unquote(path)))


def _normal(path: str) -> str:
    return posixpath.normpath(unquote(path.partition("?")[0]))


def _skip_valid_key(value: str) -> bool:
    """True when a fuzzed credential header happens to carry a valid key (the server strips blanks)."""
    tokens = value.split()
    return bool(tokens) and tokens[-1] in KEYS.values() and len(tokens) <= 2


@FUZZ
@given(route=st.sampled_from(ROUTES), header=st.sampled_from(["authorization", "x-api-key", "x-goog-api-key"]),
       value=st.one_of(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200),
                       st.sampled_from(["Bearer", "Bearer ", "Basic Zm9vOmJhcg==", "bearer  ", "Bearer\tx",
                                        "Bearer " + "k" * 4000, "Bearer fuzz-key-reject x",
                                        "Bearer kgate_" + "A" * 43, "kgate_", "fuzz-key-rejec"])))
def test_bad_credentials_are_401_in_shape(harness: Harness, route: Route, header: str, value: str) -> None:
    if _skip_valid_key(value):
        return
    with Untouched(harness, "fuzzer"):
        reply = harness.run(harness.request("POST", route.path, orjson.dumps(route.template),
                                            {header: value, "Content-Type": "application/json"}))
        assert_error_shape(reply, route.shape)
        assert reply.status == 401


PROVIDER_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")


@FUZZ
@given(values=st.fixed_dictionaries({}, optional={
    name: st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\x7f"),
                  max_size=300)
    for name in PROVIDER_HEADERS}))
def test_forwarded_provider_headers_are_clean(harness: Harness, values: dict[str, str]) -> None:
    """Provider headers the gateway forwards arrive as printable ASCII only; anything else is dropped."""
    route = ROUTES[3]  # Anthropic: anthropic-version is the header most worth abusing
    headers = {**auth_headers(route, "roamer"), **values}
    reply = harness.run(harness.request("POST", route.path, orjson.dumps({**route.template, "max_tokens": 8}),
                                        headers))
    assert reply.status == 200, reply.body[:300]
    sent = harness.run(harness.sim_last())["headers"]
    for name, value in sent.items():
        assert value.isascii() and value.isprintable(), (name, value)
    for name, value in values.items():
        value = value.strip(" \t")  # HTTP drops blanks around a value
        if value.isascii() and value.isprintable():
            assert sent.get(name) == value, (name, value, sent.get(name))
        elif name == "anthropic-version":
            assert sent[name] == "2023-06-01"  # the gateway's default instead of the client's junk
        else:
            assert name not in sent, (name, sent.get(name))


# ------------------------------------------------------------------------------------ specific attacks
def test_deep_nesting_is_a_clean_400(harness: Harness) -> None:
    """100k levels of '[' (a parser bomb), and valid bodies nesting deeper than the gateway can forward."""
    def nested(route: Route, depth: int) -> bytes:
        return orjson.dumps(route.template)[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"

    for principal in ("fuzzer", "clamper"):
        with Untouched(harness, principal):
            for route in ROUTES:
                headers = auth_headers(route, principal)
                for raw in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000):
                    reply = harness.run(harness.request("POST", route.path, raw, headers))
                    assert_error_shape(reply, route.shape)
                    assert reply.status in (400, 413)
                for depth in (254, 255, 256, 300, 1000, 1023, 1024, 1025, 5000):
                    reply = harness.run(harness.request("POST", route.path, nested(route, depth), headers))
                    assert_error_shape(reply, route.shape)
                    assert reply.status == 400, (route.path, depth, reply.body[:300])
    for route in ROUTES:  # 250 levels are served
        reply = harness.run(harness.request("POST", route.path, nested(route, 249), auth_headers(route, "roamer")))
        assert reply.status == 200, reply.body[:300]


def test_duplicate_keys_meter_what_is_forwarded(harness: Harness) -> None:
    """With duplicate keys the last wins — in the gateway, and in what it forwards (its own re-encoding),
    so the upstream can never be asked for more samples than were metered."""
    headers = auth_headers(ROUTES[0], "roamer")
    raw = b'{"model": "ghost", "model": "dense", "messages": [{"role": "user", "content": "hi"}],' \
          b' "n": 64, "n": 2, "max_tokens": 8, "max_tokens": 4}'
    reply = harness.run(harness.request("POST", "/v1/chat/completions", raw, headers))
    assert reply.status == 200, reply.body[:300]
    assert float(reply.headers["x-kgate-k-max"]) == 2.0
    sent = harness.run(harness.sim_last())["body"]
    assert (sent["n"], sent["max_tokens"], sent["model"]) == (2, 4, "llama-sim-8b")
    with Untouched(harness, "fuzzer"):
        raw = b'{"model": "dense", "messages": [{"role": "user", "content": "hi"}], "n": 1, "n": 1000000000}'
        reply = harness.run(harness.request("POST", "/v1/chat/completions", raw, auth_headers(ROUTES[0], "fuzzer")))
        assert_error_shape(reply, "openai")
        assert reply.status == 400 and "'n'" in reply.json()["error"]["message"]


def test_huge_numbers_everywhere_are_refused_not_crashed(harness: Harness) -> None:
    """n = 10^9, best_of and candidateCount far past a float, caps past 2^64: 400/403, never a 500."""
    cases = [  # (path, raw JSON members added to the route's valid body; the last of a duplicate wins)
        ("/v1/chat/completions", b'"n": 1000000000'), ("/v1/chat/completions", b'"best_of": 1e308'),
        ("/v1/chat/completions", b'"best_of": 18446744073709551615'),
        ("/v1/chat/completions", b'"best_of": 100000000000000000000000000000000000000000'),
        ("/v1/chat/completions", b'"max_tokens": 1e308'), ("/v1/chat/completions", b'"max_completion_tokens": -1e308'),
        ("/v1/chat/completions", b'"n": 0.5'), ("/v1/chat/completions", b'"n": -0'),
        ("/v1/completions", b'"best_of": 1e300, "n": 1'), ("/v1/completions", b'"n": 128, "prompt": ["a", "b", "c"]'),
        ("/v1/responses", b'"max_output_tokens": 1000000000000000000000000000000'),
        ("/v1/messages", b'"max_tokens": 1e308, "thinking": {"type": "enabled", "budget_tokens": 1e307}'),
        ("/v1/messages", b'"max_tokens": 5e-324'),
        ("/v1beta/models/dense:generateContent", b'"generationConfig": {"candidateCount": 1e308}'),
        ("/v1beta/models/dense:generateContent", b'"generationConfig": {"candidateCount": 1000000000}'),
        ("/v1beta/models/dense:generateContent", b'"generationConfig": {"maxOutputTokens": -1e308}'),
        ("/v1beta/models/reasoner:streamGenerateContent",
         b'"generationConfig": {"thinkingConfig": {"thinkingBudget": -9223372036854775808}}'),
    ]
    routes = {r.path: r for r in ROUTES}
    with Untouched(harness, "fuzzer"):
        for path, extra in cases:
            route = routes[path]
            raw = orjson.dumps(route.template)[:-1] + b", " + extra + b"}"
            reply = harness.run(harness.request("POST", path, raw, auth_headers(route, "fuzzer")))
            assert_error_shape(reply, route.shape)
            assert reply.status in (400, 403), (path, extra, reply.body[:300])


def test_oversized_bodies_are_413(harness: Harness) -> None:
    """Declared too large, sent too large without a length (chunked), and a gzip bomb."""
    route = ROUTES[0]
    headers = auth_headers(route, "fuzzer")
    big = orjson.dumps({**route.template, "pad": "x" * (MAX_BODY + 1)})

    async def chunked() -> Any:
        async def gen() -> Any:
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]
        return await harness.request("POST", route.path, gen(), headers)

    bomb = gzip.compress(orjson.dumps({**route.template, "pad": "x" * (64 * MAX_BODY)}), 9)
    assert len(bomb) < MAX_BODY
    with Untouched(harness, "fuzzer"):
        for reply in (harness.run(harness.request("POST", route.path, big, headers)), harness.run(chunked()),
                      harness.run(harness.request("POST", route.path, bomb,
                                                  {**headers, "Content-Encoding": "gzip"}))):
            assert_error_shape(reply, "openai")
            assert reply.status == 413
        # A declared length far past the limit is refused before a byte of the body is read.
        head = (f"POST {route.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['fuzzer']}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {10**15}\r\n\r\n").encode()
        reply = harness.run(harness.raw(head + b"{"))
        assert reply.status == 413 and reply.json()["error"]["code"]


def test_slow_client_does_not_block_others(harness: Harness) -> None:
    """A body trickled byte by byte holds one connection, not the gateway: others are served meanwhile,
    and the slow request is answered correctly in the end."""
    route = ROUTES[0]
    body = orjson.dumps({**route.template, "model": "ghost"})
    head = (f"POST {route.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['fuzzer']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    async def trickle() -> tuple[Reply, float]:
        reader, writer = await asyncio.open_connection(harness.host, harness.port)
        try:
            writer.write(head)
            for i in range(len(body)):
                writer.write(body[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.02)
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            return await _read_rest(reader, raw, 10), time.perf_counter()
        finally:
            writer.close()

    async def others() -> list[float]:
        lat = []
        for _ in range(30):
            t0 = time.perf_counter()
            r = await harness.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEYS['fuzzer']}"})
            assert r.status == 200
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)
        return lat

    async def both() -> tuple[list[Reply], list[float], float, float]:
        slow = [asyncio.create_task(trickle()) for _ in range(20)]  # twenty slow clients at once
        await asyncio.sleep(0.05)
        lat = await others()
        fast_done = time.perf_counter()
        answers = await asyncio.gather(*slow)
        return [r for r, _ in answers], lat, fast_done, min(t for _, t in answers)

    with Untouched(harness, "fuzzer"):
        replies, lat, fast_done, first_slow_done = harness.run(both())
    for reply in replies:
        assert_error_shape(reply, "openai")
        assert reply.status == 404  # the slow body was read whole and judged: the model is unknown
    assert fast_done < first_slow_done, "the fast requests waited for the slow bodies"
    assert max(lat) < 1.0, f"a request waited {max(lat):.3f} s behind slow clients"


def _raw_request(path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: x"]
    lines += [k + b": " + v for k, v in headers]
    lines += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_header_injection_is_refused_or_not_forwarded(harness: Harness) -> None:
    """CR/LF, NUL and other controls in a forwarded header value are refused by the HTTP parser (a plain
    400 before the app); bytes it lets through (obs-text, DEL) are never forwarded upstream."""
    route = ROUTES[3]
    body = orjson.dumps({**route.template, "max_tokens": 8})
    key = (b"x-api-key", KEYS["roamer"].encode())
    with Untouched(harness):
        for value in (b"2023-06-01\rX-Injected: 1", b"2023-06-01\nX-Injected: 1", b"2023\x00", b"a\x0bb",
                      b"a\x1bb", b"2023-06-01\x7f"):
            reply = harness.run(harness.raw(_raw_request(route.path, [key, (b"anthropic-version", value)], body)))
            assert reply.status == 400, (value, reply.status)
        # obs-fold: a continuation line must not smuggle a header either
        raw = _raw_request(route.path, [key, (b"anthropic-version", b"2023-06-01\r\n X-Injected: 1")], body)
        assert harness.run(harness.raw(raw)).status == 400
    # A CRLF ends the value: what follows is a header of its own, which is not on the forwarding list.
    for value in (b"2023-06-01\xff\xfe", "2023-06-01\u00e9".encode(),
                  b"2023-06-01\r\nX-Injected: 1"):
        reply = harness.run(harness.raw(_raw_request(route.path, [key, (b"anthropic-version", value),
                                                                  (b"anthropic-beta", value)], body)))
        assert reply.status == 200, reply.body[:300]
        sent = harness.run(harness.sim_last())["headers"]
        assert sent["anthropic-version"] == "2023-06-01", sent
        assert "anthropic-beta" not in sent or sent["anthropic-beta"] == "2023-06-01", sent
        assert all(v.isascii() and v.isprintable() for v in sent.values()), sent
        assert not any("injected" in k for k in sent)


def test_models_endpoint_under_fuzz(harness: Harness) -> None:
    with Untouched(harness, "fuzzer"):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer " + "x" * 4000},
                        {"x-api-key": "\u00e9"}, {"Authorization": "Basic abc"}):
            reply = harness.run(harness.request("GET", "/v1/models", headers=headers))
            assert_error_shape(reply, "openai")
            assert reply.status == 401
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            reply = harness.run(harness.request(method, "/v1/models", b"{}",
                                                {"Authorization": f"Bearer {KEYS['fuzzer']}"}))
            assert_error_shape(reply, "openai")
            assert reply.status == 405
        reply = harness.run(harness.request("GET", "/v1/models?x=%ff&key=1&" + "a=" * 1000,
                                            headers={"Authorization": f"Bearer {KEYS['fuzzer']}"}))
        assert reply.status == 200 and reply.json()["object"] == "list"


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_memory_stays_bounded_over_thousands_of_bad_requests(harness: Harness) -> None:
    """Thousands of hostile requests of every kind leave the process's memory where it was."""
    routes = ROUTES
    bad: list[tuple[str, bytes, dict[str, str]]] = []
    for i, route in enumerate(routes):
        headers = auth_headers(route, "fuzzer")
        first_count = next(p for p, k in route.fields if k.startswith(("n", "cap")))
        bad += [
            (route.path, b"{not json", headers),
            (route.path, b"[" * 50_000, headers),
            (route.path.replace("/dense:", f"/ghost-{i}-{'x' * 500}:").replace("/reasoner:", "/ghost:"),
             orjson.dumps({**route.template, "model": f"ghost-{i}-" + "x" * 500}), headers),
            (route.path, orjson.dumps(put(route.template, first_count, -5)), headers),
            (route.path, orjson.dumps(route.template), {"Authorization": f"Bearer kgate_{i:043d}"}),
            (route.path, b"x" * (MAX_BODY + 10), headers),
        ]

    async def barrage(count: int) -> None:
        """``count`` requests from 32 concurrent clients (a fixed pool: the test's own memory stays flat)."""
        todo = iter(range(count))

        async def client() -> None:
            for k in todo:
                path, body, headers = bad[k % len(bad)]
                if k % 7 == 0:  # many distinct unknown keys
                    headers = {**headers, "Authorization": f"Bearer kgate_unknown{k}-{time.monotonic_ns()}"}
                r = await harness.request("POST", path, body, headers)
                assert 400 <= r.status < 500, (path, r.status, r.body[:200])

        await asyncio.gather(*(client() for _ in range(32)))

    with Untouched(harness, "fuzzer"):
        # Warm up: the allocator's arenas, socket buffers and lazily built state settle in the first
        # thousands of requests (several MiB); after that the process must stay flat.
        harness.run(barrage(3000), timeout=120)
        gc.collect()
        before = _rss_kib()
        harness.run(barrage(4000), timeout=120)
        gc.collect()
        after = _rss_kib()
    assert after - before < 3 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MiB over 4000 bad requests"


def test_unknown_keys_do_not_pile_up_in_the_directory_cache(harness: Harness) -> None:
    """Lookups of unknown keys are cached (they would hammer the store otherwise), but only for their TTL:
    a flood of distinct keys leaves about one TTL's worth in memory, not every key ever tried."""
    from gateway.policy.directory import CACHE_SWEEP_MIN, CACHE_TTL

    route = ROUTES[0]
    headers = {"Content-Type": "application/json"}

    async def flood(tag: str, count: int) -> None:
        todo = iter(range(count))

        async def client() -> None:
            for k in todo:
                r = await harness.request("POST", route.path, b"{}",
                                          {**headers, "Authorization": f"Bearer kgate_{tag}{k:040d}"})
                assert r.status == 401

        await asyncio.gather(*(client() for _ in range(16)))

    directory = harness.gw.directory
    assert directory is not None
    harness.run(flood("a", 4 * CACHE_SWEEP_MIN))
    time.sleep(CACHE_TTL * 1.2)
    expired = len(directory._cache)
    fresh = max(expired, CACHE_SWEEP_MIN) + 1  # enough to cross the next sweep, wherever it is
    harness.run(flood("b", fresh))
    cached = len(directory._cache)
    assert cached <= fresh + 16, f"{cached} cache entries: the {expired} expired ones were kept"


def test_usage_estimates_survive_json_deeper_than_orjson_writes() -> None:
    """An upstream answer may nest deeper than orjson writes; the estimate must not fail the request."""
    from gateway.adapters import ADAPTERS
    from gateway.engine.compute import ComputeRequest

    deep: Any = "x"
    for _ in range(400):
        deep = [deep]
    anthropic = ADAPTERS["anthropic.messages"].usage_from_json(
        {"content": [{"type": "tool_use", "input": {"a": deep}}]}, ComputeRequest(api="anthropic.messages", model="m"))
    assert anthropic.output_tokens > 0 and anthropic.source == "estimated"
    gemini = ADAPTERS["gemini"].usage_from_json(
        {"candidates": [{"content": {"parts": [{"functionCall": {"args": deep}}]}}]},
        ComputeRequest(api="gemini", model="m"))
    assert gemini.output_tokens > 0


def test_deflate_bomb_with_declared_small_length(harness: Harness) -> None:
    """A deflate body that inflates far past the limit is refused like a gzip one."""
    route = ROUTES[0]
    bomb = zlib.compress(orjson.dumps({**route.template, "pad": "y" * (32 * MAX_BODY)}), 9)
    with Untouched(harness, "fuzzer"):
        reply = harness.run(harness.request("POST", route.path, bomb,
                                            {**auth_headers(route, "fuzzer"), "Content-Encoding": "deflate"}))
        assert_error_shape(reply, "openai")
        assert reply.status in (400, 413)
