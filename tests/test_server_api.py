"""Inspection server, read side and security: listings, groups, curves, files, token,
Host check, traversal and size limits (FastAPI TestClient, no network)."""

from __future__ import annotations

import base64
import io
import os
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rollout.server.app import create_app
from rollout.server.demo import demo_rows, write_demo_run
from rollout.server.models import Limits
from rollout.store import RolloutStore

TOKEN = "t0ken-For-Tests_123456"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_demo_run(tmp_path_factory.mktemp("srv") / "run", steps=4, groups=3, group_size=4)


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run), base_url="http://127.0.0.1") as c:
        yield c


def test_run_and_store_info(client):
    r = client.get("/api/run").json()
    assert r["name"] == "demo"
    assert [(s["name"], s["rollouts"], s["metrics"], s["eval"], s["checkpoint"]) for s in r["stages"]] == [("rl", True, True, True, False)]
    info = client.get("/api/stages/rl/store").json()
    assert info["count"] == 48 and info["steps"] == [0, 1, 2, 3]
    assert info["components"] == ["answer_match", "format", "length_penalty"]
    assert "answer_match" in info["sort_keys"] and "total_reward" in info["sort_keys"]


def test_listing_filters_sorts_and_pages(client, run):
    params = {"task": "arith", "comp": "answer_match:1:", "sort": "length", "desc": "true", "limit": 5}
    page = client.get("/api/stages/rl/rollouts", params=params).json()
    with RolloutStore.in_dir(run / "rl", readonly=True) as s:
        every = [r for r in s.query(limit=1000) if r.task == "arith" and r.components.get("answer_match") == 1.0]
    assert page["total"] == len(every) > 0
    assert [r["response_tokens"] for r in page["rows"]] == sorted((r.response_tokens for r in every), reverse=True)[:5]
    second = client.get("/api/stages/rl/rollouts", params={**params, "offset": 5}).json()
    assert {r["id"] for r in page["rows"]}.isdisjoint(r["id"] for r in second["rows"])

    by_comp = client.get("/api/stages/rl/rollouts", params={"sort": "components.length_penalty", "limit": 500}).json()["rows"]
    vals = [r["components"]["length_penalty"] for r in by_comp]
    assert vals == sorted(vals)
    ranged = client.get("/api/stages/rl/rollouts", params={"step_min": 1, "step_max": 2, "difficulty": [1, 2], "reward_min": 0.5, "limit": 500}).json()
    assert ranged["rows"] and all(1 <= r["step"] <= 2 and r["difficulty"] in (1, 2) and r["total_reward"] >= 0.5 for r in ranged["rows"])
    adv = client.get("/api/stages/rl/rollouts", params={"advantage_max": 0, "length_min": 5, "status": "ok", "policy_version": 3, "limit": 500}).json()
    assert adv["rows"] and all(r["advantage"] <= 0 and r["response_tokens"] >= 5 and r["policy_version"] == 3 for r in adv["rows"])


def test_group_view_has_every_sample_image_and_components(client):
    g = client.get("/api/stages/rl/groups/s2-g1", params={"step": 2}).json()
    assert g["step"] == 2 and len(g["samples"]) == 4
    assert [s["sample_index"] for s in g["samples"]] == [0, 1, 2, 3]
    assert g["components"] == ["answer_match", "format", "length_penalty"]
    assert all(s["advantage"] is not None for s in g["samples"])
    img = client.get("/api/files/" + g["images"][0])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).size == (48, 48)
    summaries = client.get("/api/stages/rl/groups", params={"step": 2}).json()
    assert [s["group_id"] for s in summaries] == ["s2-g0", "s2-g1", "s2-g2"]


def test_steps_metrics_curves_plot_eval(client):
    steps = client.get("/api/stages/rl/steps").json()
    assert [s["step"] for s in steps] == [0, 1, 2, 3] and all(s["n"] == 12 for s in steps)
    m = client.get("/api/stages/rl/metrics").json()
    assert "reward/total/mean" in m["keys"] and len(m["rows"]) == 4
    c = client.get("/api/stages/rl/curves").json()["curves"]
    assert c["rollouts/reward_mean"]["x"] == [0, 1, 2, 3]
    assert c["rollouts/reward_mean"]["y"] == pytest.approx([s["reward_mean"] for s in steps])
    assert "rollouts/component/answer_match" in c and "train/loss" in c
    svg = client.get("/api/stages/rl/plot.svg", params={"key": ["rollouts/reward_mean", "train/loss"], "title": "<script>x</script>"})
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.count("<polyline") == 2 and "<script>" not in svg.text
    assert client.get("/api/stages/rl/eval").json()["accuracy"] == 0.4


def test_user_errors_are_4xx_with_a_message(client):
    cases = [
        ("/api/stages/nope/steps", {}, 404, "no stage 'nope'"),
        ("/api/stages/rl/rollouts", {"sort": "nope"}, 400, "cannot sort by 'nope'"),
        ("/api/stages/rl/rollouts", {"comp": "answer_match"}, 400, "expected name:min:max"),
        ("/api/stages/rl/rollouts", {"comp": "answer_match:x:"}, 400, "bounds must be numbers"),
        ("/api/stages/rl/rollouts", {"limit": "abc"}, 422, "query.limit"),
        ("/api/stages/rl/rollouts", {"limit": 5000}, 413, "at most 500 rows"),
        ("/api/stages/rl/rollouts", {"status": "weird"}, 422, "query.status"),
        ("/api/stages/rl/groups/none-such", {}, 404, "no group"),
        ("/api/stages/rl/rollouts/999999", {}, 404, "no rollout"),
        ("/api/files/rl/images/missing.png", {}, 404, "no file"),
        ("/api/live/generate", None, 422, "body"),
    ]
    for path, params, status, text in cases:
        r = client.post(path, json=None) if params is None else client.get(path, params=params)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert text in r.json()["detail"], (path, r.json())


def test_a_bound_that_is_not_a_number_is_refused_not_matched_against_nothing(client):
    for params in [{"reward_min": "nan"}, {"advantage_max": "NaN"}, {"comp": "answer_match:nan:"}, {"comp": "answer_match::nan"}]:
        r = client.get("/api/stages/rl/rollouts", params=params)
        assert r.status_code == 400, (params, r.status_code, r.text)
        assert "not a number" in r.json()["detail"], r.json()
    # infinite bounds are bounds: everything is above -inf
    assert client.get("/api/stages/rl/rollouts", params={"reward_min": "-inf", "limit": 1}).json()["total"] == 48


def test_no_route_serves_a_page_that_loads_scripts_from_elsewhere(client):
    """FastAPI's /docs and /redoc pull their scripts from a CDN: blank on a machine without
    internet, and elsewhere a third party's code running with the inspector's origin."""
    for path in ["/docs", "/redoc", "/docs/oauth2-redirect"]:
        assert client.get(path).status_code == 404, path
    assert client.get("/openapi.json").status_code == 200
    page = client.get("/").text + client.get("/static/app.js").text
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_only_images_inside_the_run_directory_are_served(client, run, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    os.symlink(secret, run / "rl" / "images" / "link-out.png")
    for path in [
        "/api/files/%2e%2e/%2e%2e/etc/passwd",
        "/api/files/rl/%2e%2e/%2e%2e/secret.png",
        "/api/files/..%2F..%2Fetc%2Fpasswd",
        "/api/files//etc/passwd",
        "/api/files/rl/images/link-out.png",  # a symlink that points out
    ]:
        r = client.get(path)
        assert r.status_code == 403, (path, r.status_code)
        assert "run directory" in r.json()["detail"]
    r = client.get("/api/files/rl/rollouts.sqlite")  # inside, but not an image
    assert r.status_code == 403 and "only images" in r.json()["detail"]
    r = client.get("/api/files/recipe.resolved.json")
    assert r.status_code == 403


def test_token_is_required_on_every_request(run):
    with TestClient(create_app(run, token=TOKEN), base_url="http://10.1.2.3:8765") as c:
        for path in ["/", "/api/run", "/api/stages/rl/rollouts", "/api/files/rl/images/s0-g0.png", "/openapi.json", "/static/app.js"]:
            r = c.get(path)
            assert r.status_code == 401 and "token is required" in r.json()["detail"], path
            assert c.get(path, headers={"authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 403
        assert c.post("/api/live/generate", json={}).status_code == 401
        assert c.get("/api/run", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/api/run", headers={"x-vlrl-token": TOKEN}).status_code == 200
        first = c.get("/", params={"token": TOKEN})
        assert first.status_code == 200 and "vlrl_token=" in first.headers["set-cookie"] and "HttpOnly" in first.headers["set-cookie"]
        # the page's later requests (images, polling) ride on the cookie
        assert c.get("/api/files/rl/images/s0-g0.png").status_code == 200
    with pytest.raises(Exception, match="16 or more"):
        create_app(run, token="short")


def test_without_token_only_loopback_host_headers_are_answered(run):
    for base in ["http://127.0.0.1:8765", "http://localhost", "http://[::1]:9000"]:
        with TestClient(create_app(run), base_url=base) as c:
            assert c.get("/api/run").status_code == 200, base
    with TestClient(create_app(run), base_url="http://evil.example:8765") as c:
        r = c.get("/api/run")
        assert r.status_code == 403 and "localhost" in r.json()["detail"]


def _png_b64(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_body_size_sample_count_and_image_limits(run):
    limits = Limits(max_body_bytes=20_000, max_samples=4, max_new_tokens=32, max_image_pixels=64 * 64, max_prompt_chars=100)
    with TestClient(create_app(run, limits=limits), base_url="http://127.0.0.1") as c:
        big = {"checkpoint": "rl", "prompt": "hi", "image_b64": "A" * 30_000}
        r = c.post("/api/live/generate", json=big)
        assert r.status_code == 413 and "over the limit" in r.json()["detail"]

        def chunks():  # no Content-Length: counted while it streams
            yield b'{"checkpoint": "rl", "prompt": "'
            for _ in range(30):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/api/live/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413

        base = {"checkpoint": "rl", "prompt": "what is it?", "max_new_tokens": 8}
        for extra, status, text in [
            ({"n": 5}, 413, "at most 4 samples"),
            ({"max_new_tokens": 33}, 413, "at most 32"),
            ({"prompt": "x" * 101}, 413, "at most 100"),
            ({"n": 0}, 422, "body.n"),
            ({"temperature": 1e-300}, 422, "use 0 for greedy"),
            ({"top_p": 1e-300}, 422, "body.top_p"),
            ({"image_b64": "not base64!"}, 400, "not valid base64"),
            ({"image_b64": base64.b64encode(b"plain text").decode()}, 400, "not a readable image"),
            ({"image_b64": _png_b64(65)}, 413, "pixels is over the limit"),
            ({"image_b64": _png_b64(8)}, 404, "no checkpoint"),  # valid ask, but this run has no checkpoint
            ({"checkpoint": "../etc"}, 404, "no stage"),
        ]:
            r = c.post("/api/live/generate", json={**base, **extra})
            assert r.status_code == status, (extra.keys(), r.status_code, r.text)
            assert text in r.json()["detail"], r.json()


def test_store_appearing_later_and_growing_is_seen(tmp_path):
    run = tmp_path / "run"
    (run / "rl").mkdir(parents=True)
    (run / "rl" / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n')
    with TestClient(create_app(run), base_url="http://127.0.0.1") as c:
        assert c.get("/api/stages/rl/steps").status_code == 404  # no store yet
        write_demo_run(run, steps=1, groups=1, group_size=2)
        assert c.get("/api/stages/rl/store").json()["count"] == 2
        with RolloutStore.in_dir(run / "rl") as w:
            w.append(demo_rows(5, 2, 2, random.Random(0)))
        assert c.get("/api/stages/rl/store").json()["count"] == 6
        assert [s["step"] for s in c.get("/api/stages/rl/steps").json()] == [0, 5]


def test_serve_command_refuses_other_addresses_without_a_token(run):
    from typer.testing import CliRunner

    from vlrl.cli import app

    result = CliRunner().invoke(app, ["serve", "--run", str(run), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "needs --token" in str(result.exception)
    result = CliRunner().invoke(app, ["serve", "--run", str(run), "--host", "0.0.0.0", "--token", "short"])
    assert result.exit_code != 0 and "16 or more" in str(result.exception)


def test_a_store_replaced_by_a_rerun_is_reopened(tmp_path):
    run = write_demo_run(tmp_path / "run", steps=2, groups=1, group_size=2)
    with TestClient(create_app(run), base_url="http://127.0.0.1") as c:
        assert c.get("/api/stages/rl/store").json()["count"] == 4
        (run / "rl").rename(run / "rl.old")  # what `vlrl run --force rl` does with old output
        write_demo_run(run, steps=1, groups=1, group_size=3)
        assert c.get("/api/stages/rl/store").json()["count"] == 3
