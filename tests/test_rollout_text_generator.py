"""The generative judge runs on a real rollout engine through TextGenerator."""

from __future__ import annotations

import torch

from rewards import RewardSample
from rewards.models import GenerativeJudge
from rollout.engine import TextGenerator
from rollout.hf_engine import HFEngine
from vlrl.data.synth import corpus_texts
from vlrl.model.tiny import build_tiny_model


def test_judge_scores_through_hf_engine():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, processor = build_tiny_model(list(corpus_texts(0, 300)), preset="micro", seed=0)
    engine = HFEngine(model, processor)
    gen = TextGenerator(engine)
    outs = gen.generate(["Is 2 + 2 = 4 correct?", "Score this: red"], temperature=0.0, max_tokens=6)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    # Greedy is deterministic: the same prompt gives the same text again.
    assert gen.generate(["Is 2 + 2 = 4 correct?"], temperature=0.0, max_tokens=6)[0] == outs[0]

    judge = GenerativeJudge(engine=gen, sampling={"temperature": 0.0, "max_tokens": 6})
    samples = [RewardSample(response="\\boxed{4}", answer="4", task="text_arith"), RewardSample(response="\\boxed{5}", answer="4", task="text_arith")]
    results = judge(samples)
    # An untrained judge writes no score: each sample must come back as a reported failure, not a crash or a made-up score.
    assert len(results) == 2
    for r in results:
        assert isinstance(r, float) or "no score in judge output" in str(r)
