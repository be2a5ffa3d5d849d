"""The RL stage end to end on the micro model (placement inline: no Ray start; the Ray
placements are tested in test_rl_stage_ray.py): store rows, metrics, versions, learning,
the equal-reward skip, exact resume, config errors, the curriculum."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhf.curriculum import PromptCurriculum
from rollout.store import RolloutStore
from vlrl.data.images import RecordDataset
from vlrl.data.io import split_path
from vlrl.data.synth import make_dataset
from vlrl.errors import RecipeError
from vlrl.recipe import validate_recipe
from vlrl.recipe_rl import CurriculumSpec
from vlrl.runner import run_recipe
from vlrl.tracking import read_metrics
from vlrl_test_helpers import train_micro

torch.set_num_threads(1)  # the cores are shared; the runner sets threads=1 for the stages too

STEPS, PROMPTS, N = 3, 4, 4
DEVICE = "cpu"  # tests/test_cuda.py reruns some of these tests with "cuda"


def build_micro_start(root: Path) -> tuple[Path, Path]:
    """A dataset and a micro checkpoint that writes boxed answers (some right): -> (data, ckpt)."""
    data, ckpt = root / "data", root / "ckpt"
    if not (ckpt / "config.json").is_file():
        make_dataset(data, seed=1, n=60, n_eval=12)
        ds = RecordDataset(split_path(data, "train"))
        model, processor = train_micro([ds[i] for i in range(24)], steps=40, train_on=24)
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
    return data, ckpt


def rl_recipe(run_dir: Path, data: Path, ckpt: Path, **rl) -> dict:
    stage = {
        "from": str(ckpt),
        "data": str(data),
        "steps": STEPS,
        "placement": "inline",
        "rollout": {"n": N, "prompts_per_step": PROMPTS, "max_tokens": 16},
        "rewards": {"workers": 0},
        "optim": {"lr": 1e-3},
        "checkpoint_every": 2,
        "eval": False,
    }
    for k, v in rl.items():
        stage[k] = {**stage[k], **v} if isinstance(v, dict) and isinstance(stage.get(k), dict) else v
    return {"name": "rlmicro", "run_dir": str(run_dir), "device": DEVICE, "threads": 1, "tracking": {"tensorboard": False}, "stages": {"rl": stage}}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return build_micro_start(tmp_path_factory.mktemp("rlstart"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _run(raw: dict) -> Path:
    run_recipe(validate_recipe(raw))
    return Path(raw["run_dir"]) / "rl"


KEYS = [
    "reward/total/mean", "reward/total/std", "reward/format/mean", "reward/format/std", "acc/all", "response/length_mean",
    "actor/entropy", "actor/kl_loss", "actor/pg_clipfrac", "mismatch/abs_diff_mean", "perf/rollout_tokens_per_s",
    "perf/train_tokens_per_s", "time/generate", "time/reward", "time/reference", "time/train", "time/sync", "adv/std",
    "policy/version",
]


def test_micro_rl_stage_end_to_end(start, tmp_path):
    data, ckpt = start
    out = _run(rl_recipe(tmp_path / "run", data, ckpt, algo={"kl": {"coef": 0.05}}))
    assert (out / "DONE.json").is_file() and (out / "checkpoint" / "config.json").is_file()

    with RolloutStore(out / "rollouts.sqlite", readonly=True) as store:
        rows = store.query(limit=1000)
    assert len(rows) == STEPS * PROMPTS * N
    assert sorted({r.step for r in rows}) == list(range(STEPS))
    assert all(r.policy_version == r.step for r in rows)  # on-policy: step s sampled with version s
    assert all(r.advantage is not None and "format" in r.components for r in rows)
    for s in range(STEPS):  # G samples per group, advantages centred per group
        by_group: dict[str, list] = {}
        for r in rows:
            if r.step == s:
                by_group.setdefault(r.group_id, []).append(r)
        assert len(by_group) == PROMPTS and all(len(g) == N for g in by_group.values())

    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        missing = [k for k in KEYS if k not in m]
        assert not missing, missing
        assert m["mismatch/abs_diff_mean"] < 1e-3  # the trainer recomputes the sampler's logprobs
    assert [m["policy/version"] for m in metrics] == [1, 2, 3]
    assert any(m["actor/skipped"] == 0 for m in metrics)

    before, after = _weights(ckpt), _weights(out / "checkpoint")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert undocumented(metrics) == []
    # every sampled group is counted once, and repeats of a record show as fewer records
    prompts = json.loads((out / "DONE.json").read_text())["summary"]["prompts"]
    assert prompts["groups"] == STEPS * PROMPTS
    assert prompts["distinct_records"] == len({r.record_id for r in rows}) <= prompts["groups"]


def undocumented(metrics: list[dict]) -> list[str]:
    """Logged keys missing from the glossaries (docs/rl-stage.md, docs/rl-algorithms.md)."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "rl-stage.md").read_text() + (docs / "rl-algorithms.md").read_text()
    missing = set()
    for m in metrics:
        for k in m:
            if k in ("step", "time") or k.startswith("rollout_corr/") or f"`{k}`" in text:
                continue
            parts = k.split("/")
            generic = {"reward": f"reward/<name>/{parts[-1]}", "acc": "acc/<task>", "answers": f"answers/{parts[1]}/<task>",
                       "steps": f"steps/{parts[1]}/<task>", "heldout": "heldout/accuracy/<family>"}.get(parts[0])
            if generic is None or f"`{generic}`" not in text:
                missing.add(k)
    return sorted(missing)


def test_equal_rewards_skip_the_update_and_keep_the_weights(start, tmp_path):
    data, ckpt = start
    # One component with weight 0: every total is 0, every group is all-equal. With weight
    # decay 0.1, an optimizer step would shrink the weights even with a zero gradient.
    raw = rl_recipe(tmp_path / "run", data, ckpt, rewards={"workers": 0, "components": {"format": {"fn": "format", "weight": 0.0}}},
                    optim={"lr": 1e-3, "weight_decay": 0.1}, steps=2)
    out = _run(raw)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["actor/skipped"] for m in metrics] == [1.0, 1.0]
    assert all(m["adv/zero_frac"] == 1.0 for m in metrics)
    before, after = _weights(ckpt), _weights(out / "checkpoint")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with RolloutStore(out / "rollouts.sqlite", readonly=True) as store:
        assert {(r.step, r.policy_version) for r in store.query(limit=1000)} == {(0, 0), (1, 1)}


class _Killed(Exception):
    pass


def run_until_crash(monkeypatch, raw: dict, at: int = 3) -> Path:
    """Run the stage of `raw` until it dies at the start of step `at` (after the checkpoint
    before it); -> the stage folder, with the real step back in place for the rerun."""
    from rlhf import stage as stage_mod

    real_step = stage_mod.Controller.step

    def dying_step(self, s):
        if s == at:
            raise _Killed()
        return real_step(self, s)

    monkeypatch.setattr(stage_mod.Controller, "step", dying_step)
    with pytest.raises(_Killed):
        _run(raw)
    monkeypatch.setattr(stage_mod.Controller, "step", real_step)
    return Path(raw["run_dir"]) / "rl"


@pytest.mark.parametrize("bounds", [{}, {"max_pixels": 4 * 28 * 28}], ids=["own-pixels", "max_pixels"])
def test_resume_after_a_crash_replays_exactly(start, tmp_path, monkeypatch, bounds):
    """A stage that dies in step 3 resumes from its step-2 checkpoint; the result equals an
    uninterrupted run bit for bit (weights, store rows) — with the stage's own image bounds too."""
    data, ckpt = start
    ref = _run(rl_recipe(tmp_path / "ref", data, ckpt, steps=4, **bounds))

    raw = rl_recipe(tmp_path / "killed", data, ckpt, steps=4, **bounds)
    killed = run_until_crash(monkeypatch, raw)
    state = json.loads((killed / "state" / "rl_state.json").read_text())
    assert state["step"] == 2 and not state["complete"]
    with RolloutStore(killed / "rollouts.sqlite", readonly=True) as store:
        assert store.steps() == [0, 1, 2]  # step 2 ran after the checkpoint; its rows are replayed

    _run(raw)
    a, b = _weights(ref / "checkpoint"), _weights(killed / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with RolloutStore(ref / "rollouts.sqlite", readonly=True) as s1, RolloutStore(killed / "rollouts.sqlite", readonly=True) as s2:
        r1 = [(r.step, r.group_id, r.sample_index, r.response, r.total_reward, r.advantage) for r in s1.query(limit=1000, sort_by="id")]
        r2 = [(r.step, r.group_id, r.sample_index, r.response, r.total_reward, r.advantage) for r in s2.query(limit=1000, sort_by="id")]
    assert len(r1) == 4 * PROMPTS * N and sorted(r1) == sorted(r2)
    assert [m["step"] for m in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    # a complete stage is not trained again
    again = _run(raw)
    assert torch.equal(_weights(again / "checkpoint")[next(iter(a))], a[next(iter(a))])


def test_config_errors_are_one_line_and_name_the_key(start, tmp_path):
    data, ckpt = start
    with pytest.raises(RecipeError, match=r"stages\.rl.*reference is off"):
        validate_recipe(rl_recipe(tmp_path / "r", data, ckpt, reference="off", algo={"kl": {"coef": 0.1}}), "r.yaml")
    with pytest.raises(RecipeError, match=r"stages\.rl\.rollout\.bogus: unknown key"):
        validate_recipe(rl_recipe(tmp_path / "r", data, ckpt, rollout={"bogus": 1}), "r.yaml")
    with pytest.raises(RecipeError, match=r"stages\.rl\.rewards: .*nope"):
        _run(rl_recipe(tmp_path / "r", data, ckpt, rewards={"components": {"x": {"fn": "format"}}, "always": ["nope"]}))
    with pytest.raises(RecipeError, match=r"stages\.rl\.curriculum: no train records"):
        _run(rl_recipe(tmp_path / "r2", data, ckpt, curriculum={"select": {"tasks": ["no_such_task"]}}))


def test_curriculum_is_pure_in_the_cursor_and_follows_the_schedule(start):
    data, _ = start
    records = RecordDataset(split_path(data, "train")).records
    spec = CurriculumSpec.model_validate(
        {"schedule": [{"from_step": 0, "difficulty": [1, 2]}, {"from_step": 5, "difficulty": [1, 5]}], "perception_share": 0.5}
    )
    cur = PromptCurriculum(records, spec, seed=3)
    whole = cur.draw(0, 12, step=0)
    assert whole == cur.draw(0, 5, step=0) + cur.draw(5, 7, step=0)  # the cursor is the only state
    assert all(records[i].difficulty <= 2 for i in whole)
    assert cur.band(4) == (1, 2) and cur.band(5) == (1, 5)
    many = cur.draw(0, 400, step=9)
    share = np.mean([records[i].family == "perception" for i in many])
    assert 0.4 < share < 0.6
    assert max(records[i].difficulty for i in many) > 2
    with pytest.raises(ValueError, match="strictly increase"):
        CurriculumSpec.model_validate({"schedule": [{"from_step": 0, "difficulty": [1, 2]}, {"from_step": 0, "difficulty": [1, 3]}]})


def test_engine_without_its_package_fails_before_any_worker_starts(start, tmp_path):
    from vlrl.errors import NotAvailableYet

    data, ckpt = start
    # The main environment has no vllm (it lives in .venv-vllm), so the engine cannot start.
    with pytest.raises(NotAvailableYet, match="vllm package is not installed"):
        _run(rl_recipe(tmp_path / "r", data, ckpt, placement="colocate", rollout={"engine": "vllm"}))
    import ray

    assert not ray.is_initialized()


def test_pixel_bounds_shrink_rollout_prompts_and_stay_with_the_checkpoint(start, tmp_path):
    """`max_pixels` in the RL stage: every worker loads the start with the bounded
    processor (rollout prompts carry fewer image tokens), the input checkpoint is left as
    it was, and the written checkpoint keeps the bounds."""
    from vlrl.model.loading import load_processor

    data, ckpt = start
    low = 4 * 28 * 28  # 4 image tokens per image instead of 16
    before = (ckpt / "preprocessor_config.json").read_bytes() if (ckpt / "preprocessor_config.json").exists() else None
    plain = _run(rl_recipe(tmp_path / "plain", data, ckpt, steps=1))
    small = _run(rl_recipe(tmp_path / "small", data, ckpt, steps=1, max_pixels=low))

    def prompt_tokens(out: Path) -> float:
        (m,) = read_metrics(out / "metrics.jsonl")
        return m["rollout/prompt_tokens_mean"]

    with RolloutStore(small / "rollouts.sqlite", readonly=True) as store:
        rows = store.query(limit=1000)
    with_image = sum(1 for r in rows if r.images) / len(rows)
    assert with_image > 0  # some prompts carry an image (one each)
    # the same prompts (same seed and curriculum); each image: 16 -> 4 tokens
    assert prompt_tokens(plain) - prompt_tokens(small) == pytest.approx(12 * with_image)
    assert load_processor(small / "checkpoint").image_processor.size["longest_edge"] == low
    assert load_processor(plain / "checkpoint").image_processor.size["longest_edge"] > low
    after = (ckpt / "preprocessor_config.json").read_bytes() if (ckpt / "preprocessor_config.json").exists() else None
    assert after == before  # the input checkpoint is untouched (its bounded copy lives in the stage folder)
