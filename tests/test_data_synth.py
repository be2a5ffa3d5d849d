"""The synthetic task world: every task's target checks, images show what the answer says."""

from __future__ import annotations

import random
import re
from statistics import mean

import numpy as np
import pytest

from vlrl.answers import TASK_ANSWER_TYPES, answer_type_for, box_iou, is_correct, parse_box
from vlrl.data.records import Record
from vlrl.data.synth import FAMILY_TASKS, TASKS, corpus_texts, glossary_texts, select
from vlrl.data.synth.render import Scene, Shape, Text, render, text_size
from vlrl.data.synth.vocab import ALL_WORDS, COLOR_NAMES, IMAGE_SIZE, POSITIONS, SHAPES
from vlrl.errors import VlrlError

SEEDS = range(25)


def items(task: str, difficulty: int, seeds=SEEDS):
    return [TASKS[task].generate(random.Random(f"t/{task}/{difficulty}/{s}"), difficulty) for s in seeds]


def test_task_names_match_answer_types():
    assert set(TASKS) == set(TASK_ANSWER_TYPES)
    assert {t for ts in FAMILY_TASKS.values() for t in ts} == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_target_checks_against_its_answer(task):
    family = TASKS[task].family
    for d in range(1, 6):
        for it in items(task, d):
            kind = answer_type_for(task, it.meta)
            assert it.target.endswith("\\boxed{" + it.answer + "}")
            assert is_correct(it.target, it.answer, kind), (task, d, it.target, it.answer)
            assert not is_correct("\\boxed{zzz}", it.answer, kind)
            assert it.question.strip()
            assert (it.scene is None) == (family == "text")


# Tokens the tiny tokenizer will roughly need: each digit alone, words, punctuation runs.
_TOKENS = re.compile(r"\d|[^\W\d_]+|[^\w\s]+")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_targets_stay_short(task):
    longest = max(len(_TOKENS.findall(it.target)) for d in range(1, 6) for it in items(task, d, range(200)))
    assert longest <= 60


def _steps(target: str) -> int:
    return target.count("=")


@pytest.mark.parametrize("task", ["arith", "word_problem", "text_arith"])
def test_reasoning_gets_longer_with_difficulty(task):
    steps = [mean(_steps(it.target) for it in items(task, d, range(60))) for d in range(1, 6)]
    assert steps[0] < steps[2] < steps[4], steps


@pytest.mark.parametrize(("task", "measure"), [
    ("read_digits", lambda it: len(it.answer)),
    ("read_word", lambda it: len(it.answer)),
    ("count_shapes", lambda it: it.meta["n_shapes"]),
    ("shape_position", lambda it: it.meta["n_shapes"]),
    ("bbox", lambda it: it.meta["n_shapes"]),
])
def test_perception_gets_busier_with_difficulty(task, measure):
    m = [mean(measure(it) for it in items(task, d, range(60))) for d in range(1, 6)]
    assert all(a <= b for a, b in zip(m, m[1:])) and m[0] < m[4], m


def _inside(scene: Scene) -> bool:
    for it in scene.items:
        if isinstance(it, Shape):
            x1, y1, x2, y2 = it.box
        else:
            w, h = text_size(it.text, it.size)
            x1, y1, x2, y2 = it.xy[0], it.xy[1], it.xy[0] + w, it.xy[1] + h
        if not (0 <= x1 <= x2 < IMAGE_SIZE and 0 <= y1 <= y2 < IMAGE_SIZE):
            return False
    return True


def _overlap(a, b) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


@pytest.mark.parametrize("task", [t for t in sorted(TASKS) if TASKS[t].family != "text"])
def test_scenes_fit_the_canvas_and_shapes_do_not_overlap(task):
    for d in range(1, 6):
        for it in items(task, d):
            assert _inside(it.scene), (task, d, it.scene)
            boxes = [s.box for s in it.scene.items if isinstance(s, Shape)]
            assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _target_only(it) -> np.ndarray:
    """Pixels of the one shape the question is about, drawn alone without noise."""
    target = [s for s in it.scene.items if isinstance(s, Shape) and s.color == it.meta["color"] and s.kind == it.meta["kind"]]
    assert len(target) == 1
    arr = np.asarray(render(Scene(items=target)))
    ys, xs = np.nonzero((arr < 250).any(axis=2))
    return xs, ys


def test_bbox_answer_matches_drawn_pixels():
    for d in range(1, 6):
        for it in items("bbox", d):
            xs, ys = _target_only(it)
            drawn = (xs.min() * 100 / IMAGE_SIZE, ys.min() * 100 / IMAGE_SIZE,
                     (xs.max() + 1) * 100 / IMAGE_SIZE, (ys.max() + 1) * 100 / IMAGE_SIZE)
            assert box_iou(parse_box(it.answer), drawn) > 0.85, (it.answer, drawn)


def test_position_answer_matches_drawn_pixels():
    for d in range(1, 6):
        for it in items("shape_position", d):
            xs, ys = _target_only(it)
            col, row = int(xs.mean() * 3 // IMAGE_SIZE), int(ys.mean() * 3 // IMAGE_SIZE)
            assert it.answer == POSITIONS[row * 3 + col]


def test_count_answer_matches_scene():
    for d in range(1, 6):
        for it in items("count_shapes", d):
            shapes = [s for s in it.scene.items if isinstance(s, Shape)]
            n = sum(s.color == it.meta["color"] and (it.meta["kind"] is None or s.kind == it.meta["kind"]) for s in shapes)
            assert str(n) == it.answer
            assert it.answer in it.target


def _cell(box) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return POSITIONS[int(cy * 3 // IMAGE_SIZE) * 3 + int(cx * 3 // IMAGE_SIZE)]


def test_shape_color_question_picks_one_shape():
    for d in range(1, 6):
        for it in items("shape_color", d):
            shapes = [s for s in it.scene.items if isinstance(s, Shape)]
            if d <= 3:  # asked by shape: "What color is the circle?"
                hits = [s for s in shapes if s.kind == it.meta["kind"]]
            else:  # asked by place: "What color is the shape in the top left?"
                assert it.meta["position"] in it.question
                hits = [s for s in shapes if _cell(s.box) == it.meta["position"]]
            assert len(hits) == 1 and hits[0].color == it.answer


def test_reasoning_numbers_are_only_in_the_image():
    for d in range(1, 6):
        for it in items("arith", d):
            shown = " ".join(t.text for t in it.scene.items if isinstance(t, Text))
            for name, v in it.meta["values"].items():
                assert f"{name} = {v}" in shown
            constants = {str(y) for _, y in it.meta["chain"] if isinstance(y, int)}
            assert set(re.findall(r"\d+", it.question)) <= constants
        for it in items("word_problem", d):
            shown = " ".join(t.text for t in it.scene.items if isinstance(t, Text))
            values = it.meta["prices"] if it.meta["template"] == "shop" else it.meta["counts"]
            for v in values.values():
                assert str(v) in shown


def test_read_tasks_show_their_answer_legibly():
    for task in ("read_digits", "read_word"):
        for d in range(1, 6):
            for it in items(task, d, range(10)):
                (text,) = it.scene.items
                assert text.text.lower() == it.answer
                assert text.size >= 18  # ~1.3 patches tall: the smallest glyphs the tiny ViT must read
                luma = np.array([0.299, 0.587, 0.114])
                assert luma @ it.scene.background - luma @ text.fill > 120  # dark ink on a light ground


def test_generators_are_deterministic_by_rng():
    for task in TASKS:
        a = TASKS[task].generate(random.Random("same"), 4)
        b = TASKS[task].generate(random.Random("same"), 4)
        assert (a.question, a.target, a.meta) == (b.question, b.target, b.meta)
        if a.scene is not None:
            assert np.array_equal(np.asarray(render(a.scene)), np.asarray(render(b.scene)))


def test_corpus_covers_the_vocabulary_and_is_deterministic():
    texts = list(corpus_texts(seed=3, n=300))
    assert len(texts) == len(glossary_texts()) + 300
    assert texts == list(corpus_texts(seed=3, n=300))
    assert texts != list(corpus_texts(seed=4, n=300))
    joined = "\n".join(texts)
    for word in (*ALL_WORDS, *COLOR_NAMES, *SHAPES, *POSITIONS, "\\boxed{"):
        assert word in joined
    sampled = "\n".join(texts[len(glossary_texts()):])
    for q in ("How many", "Where is the", "bounding box", "The image shows", "What is", "What number comes"):
        assert q in sampled


def _rec(i, task, difficulty):
    return Record(id=str(i), messages=[{"role": "user", "content": "q"}], task=task,
                  family=TASKS[task].family, difficulty=difficulty)


def test_select_filters_by_family_task_and_difficulty():
    recs = [_rec(i, t, d) for i, (t, d) in enumerate((t, d) for t in sorted(TASKS) for d in range(1, 6))]
    assert len(select(recs)) == len(recs)
    percep = select(recs, families=["perception"], difficulty=(1, 2))
    assert {r.task for r in percep} == set(FAMILY_TASKS["perception"])
    assert {r.difficulty for r in percep} == {1, 2}
    assert [r.task for r in select(recs, tasks=["arith"], difficulty=(5, 5))] == ["arith"]
    with pytest.raises(VlrlError, match="unknown family 'vision'"):
        select(recs, families=["vision"])
    with pytest.raises(VlrlError, match="difficulty band"):
        select(recs, difficulty=(4, 2))
