"""A small synthetic run directory (store, images, metrics, eval) to try the inspector and
the report without training, and the fixture the server tests and bench build on.

The rows look like an RL stage's: G samples per prompt, an accuracy component, a format
component and a length term, GRPO advantages (reward minus group mean over group std).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from rollout.store import RolloutRow, RolloutStatus, RolloutStore

TASKS = ["read_digits", "count_shapes", "arith"]


def demo_image(path: Path, seed: int, size: int = 48) -> None:
    """A PNG with a few coloured squares (different per seed)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        x, y = rng.randrange(size - 12), rng.randrange(size - 12)
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(rng.randrange(40, 220) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def demo_rows(step: int, groups: int, group_size: int, rng: random.Random, stage: str = "rl", image_dir: str = "rl/images") -> list[RolloutRow]:
    rows = []
    for g in range(groups):
        task = TASKS[(step + g) % len(TASKS)]
        answer = str(rng.randint(0, 9))
        gid = f"s{step}-g{g}"
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"[{task}] What is the answer for picture {gid}?"}]}]
        raw = []
        for i in range(group_size):
            guess = answer if rng.random() < 0.4 + 0.1 * step else str(rng.randint(0, 9))
            boxed = rng.random() < 0.85
            text = ("Let me look. " * rng.randint(0, 4)) + (f"\\boxed{{{guess}}}" if boxed else guess)
            tokens = len(text.split()) + 3
            comps: dict[str, float | None] = {
                "answer_match": float(guess == answer),
                "format": 1.0 if boxed else 0.0,
                "length_penalty": -0.01 * tokens,
            }
            if task == "arith":
                comps["format"] = None  # not applicable, to show None in the views
            total = sum(v * (0.2 if k == "format" else 1.0) for k, v in comps.items() if v is not None)
            raw.append((i, text, tokens, comps, total))
        mean = sum(r[4] for r in raw) / len(raw)
        std = (sum((r[4] - mean) ** 2 for r in raw) / len(raw)) ** 0.5
        for i, text, tokens, comps, total in raw:
            truncated = rng.random() < 0.05
            rows.append(
                RolloutRow(
                    run="demo",
                    stage=stage,
                    step=step,
                    policy_version=step,
                    group_id=gid,
                    sample_index=i,
                    record_id=f"rec-{step}-{g}",
                    task=task,
                    difficulty=1 + (g % 5),
                    prompt=prompt,
                    images=[f"{image_dir}/{gid}.png"],
                    answer=answer,
                    response=text,
                    response_tokens=tokens,
                    finish_reason="length" if truncated else "stop",
                    status=RolloutStatus.truncated if truncated else RolloutStatus.ok,
                    components=comps,
                    total_reward=total,
                    advantage=(total - mean) / (std + 1e-6),
                    meta={"correct": comps["answer_match"] == 1.0},
                )
            )
    return rows


def write_demo_run(root: str | Path, *, steps: int = 4, groups: int = 3, group_size: int = 4, seed: int = 0, stage: str = "rl") -> Path:
    """Write (or extend) a demo run at `root`: recipe, `<stage>/rollouts.sqlite` with a PNG per
    group under `<stage>/images/`, metrics.jsonl with one row per step, eval.json and DONE.json."""
    root = Path(root)
    sdir = root / stage
    sdir.mkdir(parents=True, exist_ok=True)
    (root / "recipe.resolved.json").write_text(json.dumps({"name": "demo", "run_dir": str(root), "stages": {stage: {"kind": "rl", "from": None}}}))
    rng = random.Random(seed)
    with RolloutStore.in_dir(sdir) as store, (sdir / "metrics.jsonl").open("a") as fh:
        for step in range(steps):
            rows = demo_rows(step, groups, group_size, rng, stage=stage, image_dir=f"{stage}/images")
            for r in rows:
                if r.sample_index == 0:
                    demo_image(root / r.images[0], seed=hash((seed, r.group_id)) % 2**31)
            store.append(rows)
            acc = sum(r.components["answer_match"] for r in rows) / len(rows)
            fh.write(
                json.dumps(
                    {
                        "step": step,
                        "time": 1.0e9 + step,
                        "reward/total/mean": sum(r.total_reward for r in rows) / len(rows),
                        "reward/answer_match/mean": acc,
                        "train/loss": 1.0 / (step + 1),
                        "rollout/response_length/mean": sum(r.response_tokens for r in rows) / len(rows),
                    }
                )
                + "\n"
            )
    tasks = sorted({t for t in TASKS})
    (sdir / "eval.json").write_text(
        json.dumps(
            {
                "n": 60,
                "accuracy": 0.4,
                "by_family": {"perception": 0.5, "reasoning": 0.3},
                "by_task": {t: round(0.2 + 0.1 * i, 3) for i, t in enumerate(tasks)},
            }
        )
    )
    (sdir / "DONE.json").write_text(json.dumps({"stage": stage, "kind": "rl", "seconds": 12.5, "summary": {"steps": steps}}))
    return root
