"""Model rewards: a tiny reward model trained here and served from a Ray actor, a generative
judge on a fake engine that really fills the template, and the HTTP client against a
flaky loopback server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from fastapi import Request  # at module level: FastAPI resolves the string annotation here

from rewards import RewardSample, RewardStack
from rewards.models import check_template, parse_score, render


def S(response, answer=None, **kw):
    return RewardSample(response=response, answer=answer, prompt=[{"role": "user", "content": "what is two plus two ?"}], **kw)


# ---- score parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 7", 0.7),
        ("blah blah\nscore = 10", 1.0),
        ("I'd give it **Score: 3/5**", 0.6),
        ("on a scale of 0 to 10 ... [[8]]", 0.8),
        ("Rating: 4 out of 4", 1.0),
        (r"final \boxed{5}", 0.5),
        ("9", 0.9),
        ("Score: 42", None),  # out of scale, nothing else
        ("Score: 11. Sorry, Score: 6", 0.6),  # the last valid one
        ("The response is incorrect.", 0.0),
        ("Yes", 1.0),
        ("", None),
        ("\x00\x01 garbage ###", None),
        ("nan", None),
    ],
)
def test_parse_score_is_robust_to_junk(text, expected):
    got = parse_score(text, (0, 10))
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_parse_score_custom_pattern_and_scale():
    assert parse_score("VERDICT<2>", (1, 5), pattern=r"VERDICT<(\d)>") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        parse_score("1", (5, 1))


def test_template_checks():
    check_template("Q: {question} R: {response} {{literal}}")
    with pytest.raises(ValueError, match="unknown field"):
        check_template("{questoin}")
    assert render("{question}|{final_answer}", S("<think>long</think> 4")) == "what is two plus two ?|4"


# ---- generative judge


class TinyJudgeEngine:
    """Reads the rendered template like a judge would: compares Response with Reference answer."""

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, prompts: list[str], **sampling) -> list[str]:
        self.prompts += prompts
        outs = []
        for p in prompts:
            ref = p.split("Reference answer: ", 1)[1].split("\n", 1)[0].strip()
            resp = p.split("Response: ", 1)[1].split("\n", 1)[0]
            if "junk" in resp:
                outs.append("<<<>>> ### the model rambled")
            elif ref and ref in resp:
                outs.append(f"The response states {ref}, matching the reference. Score: 9")
            else:
                outs.append("It does not match. Rating: 2/10")
        return outs


def test_generative_judge_with_engine_from_context():
    engine = TinyJudgeEngine()
    cfg = {"components": {"judge": {"fn": "judge", "args": {"sampling": {"temperature": 0}}}}, "workers": 0}
    with RewardStack.from_config(cfg, context={"engine": engine}) as st:
        rs = st.score([S("it is 4", "4"), S("it is 5", "4"), S("junk", "4")])
    assert rs[0].components["judge"] == pytest.approx(0.9)
    assert rs[1].components["judge"] == pytest.approx(0.2)
    assert "no score in judge output" in rs[2].failures["judge"]
    assert "Question: what is two plus two ?" in engine.prompts[0]


def test_judge_without_engine_is_a_load_error():
    from vlrl.errors import RecipeError

    with pytest.raises(RecipeError, match="needs an engine"):
        RewardStack.from_config({"components": {"j": "judge"}, "workers": 0})


# ---- tiny reward model in a Ray actor


def _build_tiny_reward_model(path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    words = "[PAD] [UNK] what is two plus ? it four five the answer".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    model = Qwen2ForSequenceClassification(cfg)
    good = ["what is two plus two ?\nit is four", "what is two plus two ?\nthe answer is four"]
    bad = ["what is two plus two ?\nit is five", "what is two plus two ?\nthe answer is five"]
    enc = hf_tok(good + bad, return_tensors="pt", padding=True)
    target = torch.tensor([1.0, 1.0, -1.0, -1.0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(**enc).logits[:, 0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return float(loss.detach())


@pytest.fixture(scope="module")
def ray_rm(tmp_path_factory):
    ray = pytest.importorskip("ray")
    path = tmp_path_factory.mktemp("tiny_rm")
    loss = _build_tiny_reward_model(path)
    assert loss < 0.1
    owned = not ray.is_initialized()  # another module's fixture may have started Ray already
    if owned:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield path
    finally:
        if owned:
            ray.shutdown()


def test_hf_reward_model_in_ray_actor_with_gating(ray_rm):
    cfg = {
        "components": {
            "rule": "math_accuracy",
            "rm": {"fn": "hf_reward_model", "args": {"path": str(ray_rm), "template": "plain", "device": "cpu"}, "timeout": 120},
        },
        "gates": {"acc": {"rule": "rule", "model": "rm", "model_correct_at": 0.0}},
        "default_route": ["acc"],
        "routing": {},
        "workers": 1,
    }
    with RewardStack.from_config(cfg) as st:
        samples = [S("it is four"), S("it is five"), S(r"\boxed{4}", "4"), S(r"\boxed{5}", "4")]
        rs = st.score(samples)
        again = st.score(samples[:2])  # the actor (and its model) is reused
    good, bad = rs[0].components["acc"], rs[1].components["acc"]
    assert good > 0.5 > -0.5 > bad  # no reference: the model decides
    assert rs[2].components["acc"] == 1.0 and rs[3].components["acc"] == 0.0  # the rule decides
    assert "rm" not in rs[2].components
    assert again[0].components["rm"] == pytest.approx(good, abs=1e-5)
    assert [r.correct for r in rs] == [True, False, True, False]


def test_judge_on_an_engine_in_a_ray_actor(ray_rm):
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not importable in Ray workers
    engine = ray.remote(num_cpus=0)(TinyJudgeEngine).remote()
    with RewardStack.from_config({"components": {"j": "judge"}, "workers": 0}, context={"engine": engine}) as st:
        rs = st.score([S("it is 4", "4"), S("it is 5", "4")])
    assert [r.components["j"] for r in rs] == pytest.approx([0.9, 0.2])
    assert len(ray.get(engine.generate.remote(["Reference answer: 1\nResponse: 1\n"]))) == 1


def test_hf_reward_model_rejects_missing_path():
    from vlrl.errors import RecipeError

    with pytest.raises(RecipeError, match="not a local model directory"):
        RewardStack.from_config({"components": {"rm": {"fn": "hf_reward_model", "args": {"path": "/nonexistent/model"}}}})


# ---- OpenAI-compatible endpoint on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flaky_server():
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"hits": {}, "inflight": 0, "max_inflight": 0}

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        text = body["messages"][0]["content"]
        key = text.split("Response: ", 1)[1].split("\n", 1)[0]
        n = state["hits"][key] = state["hits"].get(key, 0) + 1
        slow = key.startswith("slow")  # abandoned (timed-out) requests linger here; count only the slow ones
        state["inflight"] += slow
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        try:
            if key.startswith("flaky") and n == 1:
                return JSONResponse({"error": "overloaded"}, status_code=503)
            if key.startswith("stall") and n == 1:
                await asyncio.sleep(5)
            if key.startswith("always-stall"):
                await asyncio.sleep(5)
            if key.startswith("refuse"):
                return JSONResponse({"error": "bad request"}, status_code=400)
            if key.startswith("slow"):
                await asyncio.sleep(0.2)
            content = "Score: 8" if "4" in key else "junk without a number"
            return {"choices": [{"message": {"role": "assistant", "content": content}}]}
        finally:
            state["inflight"] -= slow

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)


def test_openai_judge_retries_times_out_and_limits_concurrency(flaky_server):
    url, state = flaky_server
    args = {"base_url": url, "model": "judge", "request_timeout_s": 0.5, "retries": 2, "backoff_s": 0.05, "max_concurrency": 2, "api_key_env": None}
    cfg = {"components": {"http": {"fn": "openai_judge", "args": args, "timeout": 10}}, "workers": 0}
    samples = [S("flaky 4"), S("stall 4"), S("always-stall 4"), S("refuse 4"), S("plain 4 junk-free"), S("no number"), *[S(f"slow {i} 4") for i in range(6)]]
    samples[5] = S("plain")  # a reply without a score
    with RewardStack.from_config(cfg) as st:
        t0 = time.time()
        rs = st.score(samples)
        elapsed = time.time() - t0
        client = st.components["http"].local
    by = {s.response: r for s, r in zip(samples, rs)}
    assert by["flaky 4"].components["http"] == pytest.approx(0.8)  # 503, then retried
    assert by["stall 4"].components["http"] == pytest.approx(0.8)  # timed out once, then retried
    assert "failed 3 time(s)" in by["always-stall 4"].failures["http"] and "Timeout" in by["always-stall 4"].failures["http"]
    assert "HTTP 400" in by["refuse 4"].failures["http"] and state["hits"]["refuse 4"] == 1  # 4xx: no retry
    assert "no score" in by["plain"].failures["http"]
    assert all(by[f"slow {i} 4"].components["http"] == pytest.approx(0.8) for i in range(6))
    assert 1 <= state["max_inflight"] <= 2  # the semaphore held (6 slow requests, at most 2 at a time)
    assert client.stats["retries"] >= 4
    assert elapsed < 10


def test_openai_judge_outer_timeout_bounds_a_hung_endpoint(flaky_server):
    url, _ = flaky_server
    args = {"base_url": url, "model": "judge", "request_timeout_s": 30, "retries": 0, "api_key_env": None}
    with RewardStack.from_config({"components": {"http": {"fn": "openai_judge", "args": args, "timeout": 0.5}}, "workers": 0}) as st:
        t0 = time.time()
        r = st.score([S("always-stall again 4")])[0]
    assert "timeout" in r.failures["http"] and time.time() - t0 < 3
