"""Schemathesis against the server's own OpenAPI schema: generated requests to every
operation (live generation on a micro checkpoint included) never get a 5xx, and every
response matches its documented schema and content type."""

from __future__ import annotations

import atexit
import collections
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_flush_denormal(False)  # see _ieee_floats below; also needed while schemathesis builds strategies
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from rollout.server.app import create_app
from rollout.server.demo import write_demo_run
from rollout.server.models import Limits

TOKEN = "schema-test-token-0123456789"


@pytest.fixture(autouse=True)
def _ieee_floats():
    """Hypothesis refuses to run while denormals are flushed (a process-wide CPU flag);
    an earlier test's `DeviceSpec.configure()` in the same pytest process sets it."""
    torch.set_flush_denormal(False)
    yield
STATUSES: collections.Counter = collections.Counter()


def _build_app(tmp_root):
    from vlrl.data.synth import corpus_texts
    from vlrl.model.tiny import init_tiny_model

    run = write_demo_run(tmp_root / "run", steps=3, groups=2, group_size=3)
    init_tiny_model(run / "rl" / "checkpoint", corpus_texts(0, 200), preset="micro", seed=0)
    recipe = json.loads((run / "recipe.resolved.json").read_text())
    recipe["stages"]["rl"]["rewards"] = {"workers": 0}  # built-in components, scored in-process
    (run / "recipe.resolved.json").write_text(json.dumps(recipe))
    guard = create_app(run, token=TOKEN, device="cpu", limits=Limits(max_samples=2, max_new_tokens=4, max_body_bytes=256 * 1024))

    async def with_token(scope, receive, send):  # the client schemathesis drives carries the token
        if scope["type"] == "http":
            scope = {**scope, "headers": [*scope.get("headers", []), (b"authorization", f"Bearer {TOKEN}".encode())]}
        await guard(scope, receive, send)

    return with_token


def _schema():
    root = Path(tempfile.mkdtemp(prefix="vlrl-schema-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return schemathesis.openapi.from_asgi("/openapi.json", _build_app(root))


schema = _schema()


@schema.hook
def map_path_parameters(context, path_parameters):
    """Point most generated requests at things that exist (stage, group, image), so the
    handlers behind the 404s are fuzzed too; the rest keep their random values."""
    params = dict(path_parameters or {})
    for key, real in (("stage", "rl"), ("group_id", "s1-g0"), ("path", "rl/images/s0-g0.png")):
        if key in params and len(str(params[key])) % 4 != 0:
            params[key] = real
    if "rollout_id" in params and isinstance(params["rollout_id"], int) and params["rollout_id"] % 2:
        params["rollout_id"] = 1 + abs(params["rollout_id"]) % 18
    return params


@schema.hook
def map_query(context, query):
    """Most generated listings sort by a real key, so filters reach the store."""
    if isinstance(query, dict) and isinstance(query.get("sort"), str) and len(query["sort"]) % 4 != 0:
        query = {**query, "sort": "total_reward"}
    return query


@schema.hook
def map_body(context, body):
    """Most generated live requests name the run's checkpoint and stay within the limits, so
    generation and scoring run on fuzzed prompts, answers, tasks and sampling settings."""
    if not (isinstance(body, dict) and "checkpoint" in body and len(str(body.get("prompt", ""))) % 4 != 0):
        return body
    n, m = body.get("n", 1), body.get("max_new_tokens", 1)
    if isinstance(n, int) and isinstance(m, int):  # negative cases keep their wrong types
        body = {**body, "checkpoint": "rl", "n": 1 + abs(n) % 2, "max_new_tokens": 1 + abs(m) % 4}
        body.pop("image_b64", None)
    return body


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
def test_no_server_error(case):
    response = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, content_type_conformance])
    STATUSES[(case.operation.method.upper(), case.operation.path, response.status_code // 100)] += 1


def test_generated_requests_reached_the_handlers():
    """The run above must not have been all rejections: each read operation and the live
    generation answered 2xx at least once."""
    if not STATUSES:
        pytest.fail("test_no_server_error did not run first")
    ok = {(m, p) for (m, p, cls), n in STATUSES.items() if cls == 2}
    for path in ["/api/run", "/api/stages/{stage}/rollouts", "/api/stages/{stage}/groups/{group_id}", "/api/files/{path}", "/api/checkpoints", "/api/live/generate"]:
        assert any(p == path for _, p in ok), (path, sorted(STATUSES.items()))
    assert not any(cls == 5 for (_, _, cls) in STATUSES)
