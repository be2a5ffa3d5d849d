"""Warnings for RL runs drifting into a state that the per-step metrics show but that
nobody reads until the eval has collapsed.

Masked truncation runaway: with `algo.mask_truncated` (DAPO's overlong filtering) a
response cut at `rollout.max_tokens` leaves the loss, so a policy that drifts towards
longer answers is never pushed back; the drift feeds itself, because the longer it gets
the fewer responses are left to learn from. Measured on the tiny recipe (lr 3e-4,
temperature 0.7, docs/rl-stage.md): 0% of responses truncated at step 0, 45% by step
25-50, 98% by step 125-150, held-out accuracy 11.1% -> 4.3%. DAPO pairs the filtering
with a soft overlong penalty (the `overlong` reward term), which is what the warning
points at.

Answer collapse: when a task is beyond the policy, a partial-credit reward pays most
for one answer that is partly right on average, and GRPO moves every response to it.
Measured on the tiny recipe's RL (300 steps, fresh prompts, no perception anchor,
docs/rl-stage.md): read_word responses (ANLS reward) went to "blue" for 25% -> 48% -> 89%
of them over 50-step windows while no reference word covers more than 10%, and bbox
(IoU reward) to one central box; greedy read_word fell 11.5% -> 3.5%, bbox 8.0% -> 0%.
The watch compares each task's commonest response answer with its commonest reference
answer on the same prompts, so a task whose answers really are few (counts 1-5) does
not trip it.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class TruncationWatch:
    """Say once when the mean truncated share over the last `window` steps reaches
    `threshold` while truncated responses are masked and nothing penalises length."""

    masked: bool
    penalised: bool
    max_tokens: int
    threshold: float = 0.25
    window: int = 10
    _recent: deque = field(default_factory=deque, repr=False)
    warned: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        self._recent = deque(maxlen=self.window)

    def update(self, step: int, truncated_frac: float | None) -> str | None:
        """Record one step's `batch/truncated_frac`; the warning text the first time the
        window is full and its mean reaches the threshold, else None."""
        if truncated_frac is None:
            return None
        self._recent.append(float(truncated_frac))
        if self.warned or not self.masked or self.penalised or len(self._recent) < self.window:
            return None
        mean = sum(self._recent) / len(self._recent)
        if mean < self.threshold:
            return None
        self.warned = True
        cache = max(1, self.max_tokens // 4)
        fix = f"reward_terms: {{overlong: {{weight: 1.0, args: {{max_length: {self.max_tokens}, cache: {cache}}}}}}}"
        return (
            f"rl step {step}: {mean:.0%} of the responses of the last {self.window} steps hit "
            f"rollout.max_tokens ({self.max_tokens}) and algo.mask_truncated drops them from the loss, "
            "so nothing pushes their length back down and the share tends to keep growing. "
            f"Add the overlong penalty ({fix}) or raise rollout.max_tokens."
        )


@dataclass
class RewardFailureWatch:
    """Say once per reward component when it fails (an exception, a timeout, NaN, a wrong
    type). A failed component gives the sample its fallback and the run goes on, so a plugin
    failing on every sample would otherwise train the policy on its fallback for the whole
    run, with only `reward/<name>/fail_count` to show for it."""

    warned: set = field(default_factory=set)

    def update(self, step: int, failures: list[dict[str, str]]) -> list[str]:
        """Record one step's `RewardResult.failures` (one dict per sample); a warning for each
        component failing for the first time, naming it, its first cause and its share."""
        causes: dict[str, list[str]] = {}
        for f in failures:
            for name, why in f.items():
                causes.setdefault(name, []).append(why)
        out = []
        for name, whys in sorted(causes.items()):
            if name in self.warned:
                continue
            self.warned.add(name)
            out.append(
                f"rl step {step}: reward component {name!r} failed on {len(whys)} of {len(failures)} samples, "
                f"which got its fallback value instead: {whys[0]} "
                f"(every step's count: reward/{name}/fail_count; each sample's cause: the rollouts' error)"
            )
        return out


def length_is_penalised(reward_terms: dict, rewards: dict) -> bool:
    """True when the stack has a weighted length penalty: the `overlong` or `group_length`
    term in `reward_terms`, or a component calling one of them in `rewards`."""
    from rewards.stack import RewardStackConfig

    names = {"overlong", "group_length"}
    specs = [(spec.fn or key, spec.weight) for key, spec in reward_terms.items()]
    specs += [(c.fn, c.weight) for c in RewardStackConfig(**rewards).components.values()]
    return any(fn in names and weight != 0.0 for fn, weight in specs)


def route_fns(rewards: dict, task: str) -> list[str]:
    """The reward functions that score a `task` record under the stage's `rewards` section
    (its route's components by their `fn`, plus `always`): what a collapse warning needs to
    know to say whether the task is on partial credit."""
    from rewards.stack import RewardStackConfig

    stack = RewardStackConfig(**rewards)
    route = stack.routing.get(task, stack.default_route)
    names = [*(list(stack.components) if route is None else route), *stack.always]
    return [stack.components[n].fn if n in stack.components else n for n in names]


def answer_key(response: str, answer_type: str) -> str | None:
    """The answer a response gives, in a form where equal answers are equal strings: numbers
    canonical, text normalised, boxes snapped to a 10-unit grid (a collapse onto one box
    shows as boxes a pixel or two apart); None when no answer can be read."""
    from vlrl.answers import extract_answer, normalize_text, parse_box, parse_number

    pred = extract_answer(response)
    if answer_type == "number":
        v = parse_number(pred)
        return None if v is None else f"{v:g}"
    if answer_type == "box":
        b = parse_box(pred)
        return None if b is None else "[" + ", ".join(str(int(round(x / 10.0)) * 10) for x in b) + "]"
    text = normalize_text(pred)
    return text or None


def top_share(keys: list[str | None]) -> tuple[str | None, float]:
    """The commonest answer among `keys` (unreadable ones count, as None) and its share."""
    if not keys:
        return None, 0.0
    key, n = Counter(keys).most_common(1)[0]
    return key, n / len(keys)


@dataclass
class AnswerCollapseWatch:
    """Say once per task when, over the last `window` steps, one response answer makes up at
    least `share` of the task's responses and at least `ratio` times the share of the
    commonest reference answer of those responses' prompts."""

    window: int = 25
    share: float = 0.5
    ratio: float = 3.0
    min_responses: int = 100
    route: Callable[[str], list[str]] | None = None  # task -> the reward fns scoring it (route_fns), to tailor the advice
    _recent: dict = field(default_factory=dict, repr=False)  # task -> deque (one entry a step) of (response, reference) pairs
    warned: set = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if self.ratio < 1.0 or self.window < 1 or self.min_responses < 1:
            raise ValueError("ratio must be >= 1, window and min_responses >= 1")

    def _message(self, step: int, task: str, steps: int, key: str, got: float, ref: float) -> str:
        said = (
            f"rl step {step}: {got:.0%} of the {task} responses of the last {steps} steps answer {key!r}, "
            f"while no reference answer of those prompts covers more than {ref:.0%}: the policy gives one answer "
            "whatever the prompt shows. "
        )
        if self.route is not None and "answer_match" in self.route(task):
            # measured on the tiny recipe without the anchor: read_word went to 'green' under the exact verdict too
            return said + (
                f"{task} is already scored by the eval's exact verdict (answer_match), so no partial credit is being "
                "farmed: the policy is losing the task itself; hold it with algo.perception_anchor (a KL to the start "
                "policy on perception prompts) or a smaller optim.lr."
            )
        return said + (
            "A partial-credit reward (ocr_similarity, iou, partial counting) pays for "
            f"exactly this when the task is beyond the policy; give {task} its exact verdict "
            f"(rewards.routing.{task}: [answer_match, format]) or hold it with algo.perception_anchor."
        )

    def update(self, step: int, answers: dict[str, list[tuple[str | None, str | None]]]) -> list[str]:
        """Record one step's (response answer, reference answer) pairs per task; the warnings
        for tasks that collapsed in the current window (each task once)."""
        out = []
        for task, pairs in sorted(answers.items()):
            q = self._recent.setdefault(task, deque(maxlen=self.window))
            q.append(pairs)
            if task in self.warned:
                continue
            window = [p for step_pairs in q for p in step_pairs]
            if len(window) < self.min_responses:
                continue
            key, got = top_share([r for r, _ in window])
            _, ref = top_share([a for _, a in window])
            if key is None or got < self.share or got < self.ratio * ref:
                continue
            self.warned.add(task)
            out.append(self._message(step, task, len(q), key, got, ref))
        return out


@dataclass
class ModeLengthWatch:
    """Say once when, over the last `window` steps, responses under the mode with the
    smallest cap average at least `ratio` times the length of those under the mode with the
    largest: the policy is not following the modes' suffixes. Measured on the tiny recipe's
    hybrid ablation (2026-12-06, docs/rl-stage.md): no SFT record carried "Answer briefly." or
    "Think step by step.", both modes' responses stayed at 15.1 tokens for 150 steps, and
    training on prompts ending in text the policy had never seen cost 5 points of held-out
    reasoning and 4 of perception against the same RL without modes."""

    modes: dict[str, int]  # mode name -> its max_tokens
    window: int = 25
    ratio: float = 0.9
    _recent: deque = field(default_factory=deque, repr=False)  # (short length, long length) per step
    warned: bool = False
    pair: tuple | None = field(default=None, init=False, repr=False)  # ((short name, cap), (long name, cap)); None: nothing to compare

    def __post_init__(self) -> None:
        if self.window < 1 or not 0.0 < self.ratio <= 1.0:
            raise ValueError("window must be >= 1 and ratio in (0, 1]")
        self._recent = deque(maxlen=self.window)
        caps = sorted(self.modes.items(), key=lambda kv: kv[1])
        self.pair = (caps[0], caps[-1]) if len(caps) >= 2 and caps[0][1] < caps[-1][1] else None

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        """Record one step's `mode/<name>/length_mean`; the warning text the first time the
        window is full and the short mode is about as long as the long one, else None."""
        if self.pair is None or self.warned:
            return None
        (short, cap_s), (long, cap_l) = self.pair
        got = metrics.get(f"mode/{short}/length_mean"), metrics.get(f"mode/{long}/length_mean")
        if None in got:  # a step with no prompt in one of the modes
            return None
        self._recent.append(got)
        if len(self._recent) < self.window:
            return None
        ls = sum(a for a, _ in self._recent) / len(self._recent)
        ll = sum(b for _, b in self._recent) / len(self._recent)
        if ls < self.ratio * ll:
            return None
        self.warned = True
        return (
            f"rl step {step}: over the last {len(self._recent)} steps, responses in mode {short!r} (cap {cap_s}) average "
            f"{ls:.1f} tokens and in mode {long!r} (cap {cap_l}) {ll:.1f}: the policy does not follow the modes' suffixes. "
            "If its SFT data never carried them, every RL prompt ends in text it has not seen (the tiny recipe's ablation: "
            "-5 points of held-out reasoning and -4 of perception against the same RL without modes); teach the suffixes "
            "in SFT first, or drop rollout.modes."
        )


@dataclass
class FirstStepCollapseWatch(AnswerCollapseWatch):
    """The same watch over the first computation of worked solutions ("6 + 2 = 8"): answers
    can stay varied while every response starts from one memorised equation, which is what a
    reward that checks the steps but not the values they use pays for (docs/rl-stage.md,
    "Reading or arithmetic?": 40% of arith responses began "6 + 2 = 8" within 140 steps).
    References' first steps are spread thin (the commonest covered 2-8% of a 25-step window in
    the runs measured), so a quarter of the responses is already far off them."""

    share: float = 0.25

    def _message(self, step: int, task: str, steps: int, key: str, got: float, ref: float) -> str:
        return (
            f"rl step {step}: {got:.0%} of the {task} responses of the last {steps} steps begin with {key!r}, "
            f"while no reference's first step covers more than {ref:.0%}: the policy writes one computation "
            "whatever the prompt shows. A reward that checks the steps (their arithmetic, their form) without "
            "checking the values they use pays for exactly this; tie it to the reference's values (step_match) "
            "or drop it."
        )


def first_step_key(text: str) -> str | None:
    """The first computation of a worked solution as written (spaces collapsed); None without one."""
    from vlrl.worked_steps import computations

    steps = computations(text)
    return steps[0].text if steps else None
