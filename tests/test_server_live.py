"""Live side: a micro checkpoint in the run directory is sampled on a prompt and an
uploaded image, and every sample is scored by the run's reward stack (or the built-in one)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rollout.server.app import create_app
from rollout.server.demo import write_demo_run
from vlrl.data.synth import corpus_texts
from vlrl.model.tiny import init_tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = write_demo_run(tmp_path_factory.mktemp("live") / "run", steps=1, groups=1, group_size=2)
    init_tiny_model(root / "rl" / "checkpoint", corpus_texts(0, 200), preset="micro", seed=0)
    return root


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_generate_and_score_with_default_stack(run):
    with TestClient(create_app(run, device="cpu"), base_url="http://127.0.0.1") as c:
        assert c.get("/api/checkpoints").json() == [{"stage": "rl", "path": "rl/checkpoint"}]
        body = {"checkpoint": "rl", "prompt": "How many shapes?", "image_b64": png_b64(), "answer": "3", "task": "count_shapes", "n": 3, "max_new_tokens": 6, "seed": 1}
        r = c.post("/api/live/generate", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["reward_source"] == "default" and out["policy_version"] == 0
        assert [s["index"] for s in out["samples"]] == [0, 1, 2]
        # the built-in routing for count_shapes: counting + format, each reported per sample
        assert out["components"] == ["counting", "format"]
        for s in out["samples"]:
            assert 1 <= s["tokens"] <= 6 and s["finish_reason"] in ("stop", "length")
            assert set(s["components"]) == {"counting", "format"} and s["components"]["counting"] in (0.0, 1.0)
            assert s["total"] == pytest.approx(sum(s["contributions"].values()))
        again = c.post("/api/live/generate", json=body).json()  # same seed, same weights: same samples
        assert [s["text"] for s in again["samples"]] == [s["text"] for s in out["samples"]]
        text_only = c.post("/api/live/generate", json={"checkpoint": "rl", "prompt": "2+2?", "answer": "4", "task": "chat", "n": 2, "max_new_tokens": 4})
        assert text_only.status_code == 200 and text_only.json()["components"] == ["answer_match", "format"]


def test_generate_scores_with_the_recipes_reward_stack(run, tmp_path):
    recipe = json.loads((run / "recipe.resolved.json").read_text())
    recipe["stages"]["rl"]["rewards"] = {"components": {"acc": {"fn": "answer_match"}, "fmt": {"fn": "format", "weight": 0.5}}, "workers": 0}
    (run / "recipe.resolved.json").write_text(json.dumps(recipe))
    with TestClient(create_app(run, device="cpu"), base_url="http://127.0.0.1") as c:
        r = c.post("/api/live/generate", json={"checkpoint": "rl", "prompt": "Which digit?", "image_b64": png_b64(), "answer": "7", "task": "read_digits", "n": 2, "max_new_tokens": 5})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["reward_source"] == "recipe" and out["components"] == ["acc", "fmt"]
        for s in out["samples"]:
            assert s["contributions"]["fmt"] == pytest.approx(0.5 * s["components"]["fmt"])
        recipe["stages"]["rl"]["rewards"] = {"components": {"acc": {"fn": "no_such_plugin"}}}
        (run / "recipe.resolved.json").write_text(json.dumps(recipe))
    with TestClient(create_app(run, device="cpu"), base_url="http://127.0.0.1") as c:
        r = c.post("/api/live/generate", json={"checkpoint": "rl", "prompt": "x", "n": 1, "max_new_tokens": 2})
        assert r.status_code == 400 and "no_such_plugin" in r.json()["detail"]
