"""The inspector page in headless Chromium: open a run, filter, open a group, see the image
and the components; a screenshot is saved (tmp_path) for a person to look at."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from rollout.server.app import create_app
from rollout.server.demo import write_demo_run

CHROMIUM = "/usr/bin/chromium"
# As root on a closed network: no sandbox, and none of Chromium's background connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def running(app):
    """uvicorn on a free loopback port in a thread -> base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url: str):
    """The inspector page, loaded -> (page, the page's script errors so far and to come)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page, errors


def test_page_filters_opens_group_and_shows_image_and_components(tmp_path, browser):
    run = write_demo_run(tmp_path / "run", steps=3, groups=3, group_size=4)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        assert page.locator("#run-name").inner_text().endswith("demo")
        assert page.locator("#rows tbody tr").count() == 36  # 3 x 3 x 4 rollouts, one page

        # filter: one task, accuracy component 1, sorted by total reward
        filter_arith_correct(page, "total_reward")
        page.wait_for_function("document.querySelector('#page-info').textContent.includes('of')")
        # the unfiltered table from the first load is replaced asynchronously: wait until the
        # filtered one is in place, or a slow render leaves rows.count() counting the old table
        page.wait_for_function(
            "(rs => rs.length > 0 && rs.every(r => r.cells.length > 2 && r.cells[2].textContent === 'arith'))"
            "([...document.querySelectorAll('#rows tbody tr')])"
        )
        rows = page.locator("#rows tbody tr")
        n = rows.count()
        assert n > 0
        tasks = {rows.nth(i).locator("td").nth(2).inner_text() for i in range(n)}
        assert tasks == {"arith"}
        rewards = [float(rows.nth(i).locator("td").nth(6).inner_text()) for i in range(n)]
        assert rewards == sorted(rewards, reverse=True)

        # open the first row's group: the image loads, every component is compared
        rows.first.locator("a.group-link").click()
        page.wait_for_selector("#group:not([hidden]) img.prompt-image")
        page.wait_for_function("document.querySelector('#group img.prompt-image').naturalWidth > 0")
        assert page.locator("#group-samples .sample-card").count() == 4
        comp_rows = page.locator("#group-components tbody tr")
        names = [comp_rows.nth(i).get_attribute("data-component") for i in range(comp_rows.count())]
        assert names[:3] == ["answer_match", "format", "length_penalty"] and "total" in names and "advantage" in names
        assert page.locator("#group-samples .sample-card").first.locator(".bar[data-component='answer_match']").count() == 1

        shot = tmp_path / "inspector.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # curves tab shows rendered SVG plots
        page.click("button.tab[data-tab='curves']")
        page.wait_for_function("[...document.querySelectorAll('#plots img')].length >= 3 && [...document.querySelectorAll('#plots img')].every(i => i.complete && i.naturalWidth > 0)")
        assert not errors, errors


def test_curves_tab_draws_the_heldout_curve(tmp_path, browser):
    import json

    run = write_demo_run(tmp_path / "run", steps=3, groups=2, group_size=2)
    with (run / "rl" / "metrics.jsonl").open("a") as fh:
        for step, acc in ((0, 0.18), (2, 0.21)):
            fh.write(json.dumps({"step": step, "heldout/accuracy": acc, "heldout/accuracy/reasoning": acc - 0.01}) + "\n")
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        page.click("button.tab[data-tab='curves']")
        held = "#plots img[alt='held-out accuracy (greedy)']"
        page.wait_for_function(f"(i => i && i.complete && i.naturalWidth > 0)(document.querySelector(\"{held}\"))")
        src = page.locator(held).get_attribute("src")
        assert "key=heldout%2Faccuracy" in src and "key=heldout%2Faccuracy%2Freasoning" in src
        other = page.locator("#plots img[alt='accuracy (metrics.jsonl)']")
        assert other.count() == 0 or "heldout" not in other.get_attribute("src")
        assert not errors, errors


def filter_arith_correct(page, sort: str, descending: bool = True) -> None:
    """The filter form set to arith rollouts whose answer_match is 1, sorted by `sort`, applied."""
    page.select_option("#f-task", "arith")
    page.select_option("#f-comp", "answer_match")
    page.fill("#f-comp-min", "1")
    page.select_option("#f-sort", sort)
    if not descending:
        page.uncheck("#f-desc")
    page.click("#apply")


def test_reset_clears_every_filter_and_lists_all_rollouts_again(tmp_path, browser):
    run = write_demo_run(tmp_path / "run", steps=3, groups=3, group_size=4)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        filter_arith_correct(page, "length", descending=False)
        page.wait_for_function("!document.querySelector('#page-info').textContent.endsWith('of 36')")

        page.get_by_role("button", name="Reset").click()
        page.wait_for_function("document.querySelector('#page-info').textContent === '1–36 of 36'", timeout=5_000)
        filters = page.evaluate("['#f-task', '#f-comp', '#f-comp-min', '#f-sort'].map(s => document.querySelector(s).value)")
        assert filters == ["", "", "", "total_reward"]  # the sort the page opens with
        assert page.locator("#f-desc").is_checked()
        assert not errors, errors


def test_a_stage_without_rollouts_shows_none_of_the_previous_stages_rollout_views(tmp_path, browser):
    import json

    run = write_demo_run(tmp_path / "run", steps=3, groups=2, group_size=2)
    recipe = json.loads((run / "recipe.resolved.json").read_text())
    recipe["stages"] = {"sft": {"kind": "sft"}, **recipe["stages"]}
    (run / "recipe.resolved.json").write_text(json.dumps(recipe))
    (run / "sft").mkdir()
    (run / "sft" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 4)))
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        assert page.locator("#stage").input_value() == "rl"
        page.select_option("#stage", "sft")
        page.wait_for_function("document.querySelector('#page-info').textContent === 'this stage has no rollout store'")
        assert page.locator("#steps-count").inner_text() == ""
        assert page.locator("#steps th").count() == 0 and page.locator("#rows th").count() == 0  # rl's columns are gone

        page.click("button.tab[data-tab='curves']")
        page.wait_for_function("[...document.querySelectorAll('#plots img')].some(i => i.alt === 'loss')")
        alts = page.eval_on_selector_all("#plots img", "imgs => imgs.map(i => i.alt)")
        assert alts == ["loss"]  # no empty rollout plots left over from rl
        assert not errors, errors


def test_a_run_that_has_no_stage_yet_says_so_and_shows_the_first_one_when_it_appears(tmp_path, browser):
    run = tmp_path / "run"
    run.mkdir()
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        assert page.locator("#page-info").inner_text() == "this run has no stage output yet"
        write_demo_run(run, steps=2, groups=2, group_size=2)  # the run starts writing
        page.wait_for_function("document.querySelector('#page-info').textContent === '1–8 of 8'", timeout=15_000)
        assert page.locator("#stage").input_value() == "rl"
        assert not errors, errors


def test_a_long_run_keeps_the_filters_and_listing_in_view(tmp_path, browser):
    run = write_demo_run(tmp_path / "run", steps=80, groups=1, group_size=2)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        assert page.locator("#steps tbody tr").count() == 80
        viewport = page.viewport_size["height"]
        # the steps table scrolls in its own box instead of pushing everything below it off screen
        assert page.locator("#filters").bounding_box()["y"] < viewport / 2
        assert page.locator("#rows tbody tr").first.bounding_box()["y"] < viewport
        assert not errors, errors


def test_a_mean_that_rounds_to_zero_is_shown_without_a_minus_sign(tmp_path, browser):
    import random

    from rollout.server.demo import demo_rows
    from rollout.store import RolloutStore

    run = write_demo_run(tmp_path / "run", steps=1, groups=1, group_size=3)
    rows = demo_rows(1, 1, 3, random.Random(0))
    for r, a in zip(rows, (-0.1, -0.2, 0.3)):  # mean -1.9e-17, as GRPO's advantages come out
        r.advantage = a
    with RolloutStore.in_dir(run / "rl") as s:
        s.append(rows)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        header = page.eval_on_selector_all("#steps thead th", "ths => ths.map(t => t.textContent)")
        first = page.eval_on_selector_all("#steps tbody tr:first-child td", "tds => tds.map(t => t.textContent)")
        assert first[0] == "1" and first[header.index("advantage")] == "0.000"
        assert not errors, errors


def live_run(tmp_path):
    """A demo run with a micro checkpoint in rl/ and a recipe rewards section (format weighed 0.5)."""
    import json

    from vlrl.data.synth import corpus_texts
    from vlrl.model.tiny import init_tiny_model

    run = write_demo_run(tmp_path / "run", steps=1, groups=1, group_size=2)
    init_tiny_model(run / "rl" / "checkpoint", corpus_texts(0, 200), preset="micro", seed=0)
    recipe = json.loads((run / "recipe.resolved.json").read_text())
    recipe["stages"]["rl"]["rewards"] = {"components": {"acc": {"fn": "answer_match"}, "fmt": {"fn": "format", "weight": 0.5}}, "workers": 0}
    (run / "recipe.resolved.json").write_text(json.dumps(recipe))
    return run


def generate_live(page, n: int = 2) -> dict:
    """Fill the live form, generate -> the API's answer, once the cards are drawn."""
    page.click("button.tab[data-tab='live']")
    page.fill("#live-answer", "7")
    page.fill("#live-n", str(n))
    page.fill("#live-max", "4")
    with page.expect_response("**/api/live/generate") as resp:
        page.click("#live-go")
    page.wait_for_selector("#live-samples .sample-card")
    return resp.value.json()


def test_live_tab_shows_each_components_weighted_contribution(tmp_path, browser):
    with running(create_app(live_run(tmp_path), device="cpu")) as url:
        page, errors = open_page(browser, url)
        out = generate_live(page)
        cards = page.locator("#live-samples .sample-card")
        assert cards.count() == 2
        for i, s in enumerate(out["samples"]):
            assert cards.nth(i).locator(".contributions").count() == 1
            shown = cards.nth(i).locator(".contributions").inner_text()
            assert set(s["contributions"]) == {"acc", "fmt"}
            for name, v in s["contributions"].items():
                assert f"{name} {v:+.3f}" in shown, (shown, s["contributions"])
        assert not errors, errors


def test_live_status_does_not_call_a_trained_checkpoint_policy_version_0(tmp_path, browser):
    """The engine counts weight updates since it loaded the checkpoint: always 0 here, which
    beside the listing's policy versions read as 'the untrained weights'."""
    with running(create_app(live_run(tmp_path), device="cpu")) as url:
        page, errors = open_page(browser, url)
        out = generate_live(page)
        status = page.locator("#live-status").inner_text()
        assert status.startswith("2 samples from rl;") and "recipe stack" in status, status
        assert "version" not in status and out["policy_version"] == 0
        assert not errors, errors

def test_live_prompt_box_spans_two_columns_of_the_form(tmp_path, browser):
    run = write_demo_run(tmp_path / "run", steps=1, groups=1, group_size=2)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        page.click("button.tab[data-tab='live']")
        prompt = page.locator("#live-prompt").bounding_box()["width"]
        one_column = page.locator("#live-answer").bounding_box()["width"]
        assert prompt > 1.8 * one_column, (prompt, one_column)
        assert not errors, errors


def test_opening_the_page_logs_no_console_error(tmp_path, browser):
    """A 404 for the browser's own /favicon.ico request was an error in every user's console."""
    run = write_demo_run(tmp_path / "run", steps=1, groups=1, group_size=2)
    with running(create_app(run)) as url:
        page = browser.new_page()
        failed: list[str] = []  # the favicon request is the browser's, seen only as a console error
        page.on("console", lambda m: failed.append(f"{m.text} {m.location.get('url')}") if m.type == "error" else None)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(500)
        assert not failed, failed


def test_polling_fetches_the_metrics_only_when_metrics_jsonl_grew(tmp_path, browser):
    """Every poll downloaded all of metrics.jsonl to count its rows: 1.6 MB every 3 s for a
    450-step RL stage, growing with the run."""
    import json

    run = write_demo_run(tmp_path / "run", steps=2, groups=1, group_size=2)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        seen: list[str] = []
        page.on("request", lambda r: seen.append(r.url.split("?")[0].rsplit("/", 1)[-1]))
        deadline = 12_000
        while seen.count("run") < 2 and deadline > 0:  # two polls of an unchanged run
            page.wait_for_timeout(200)
            deadline -= 200
        assert seen.count("run") >= 2, seen
        assert "metrics" not in seen, seen
        with (run / "rl" / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": 2, "train/loss": 0.2}) + "\n")
        page.wait_for_event("request", lambda r: "/metrics" in r.url, timeout=10_000)  # the plots reload
        assert not errors, errors


def test_a_reference_solution_added_by_guidance_is_labelled_as_one(tmp_path, browser):
    import random

    from rollout.server.demo import demo_rows
    from rollout.store import RolloutStore

    run = write_demo_run(tmp_path / "run", steps=1, groups=1, group_size=3)
    rows = demo_rows(1, 1, 3, random.Random(0))
    rows[-1].meta = {**rows[-1].meta, "guided": True}  # algo.guidance stores the reference as the last member
    with RolloutStore.in_dir(run / "rl") as s:
        s.append(rows)
    with running(create_app(run)) as url:
        page, errors = open_page(browser, url)
        page.wait_for_function("document.querySelectorAll('#rows tbody tr').length === 6")
        marks = page.eval_on_selector_all("#rows tbody tr", "trs => trs.map(t => t.cells[5].textContent)")
        assert sorted(marks) == ["0", "0", "1", "1", "2", "2 reference"]
        guided = page.locator("#rows tbody tr", has_text="2 reference")
        guided.locator("a.group-link").click()
        page.wait_for_selector("#group:not([hidden])")
        titles = page.eval_on_selector_all("#group-samples .sample-card h4 > span:first-child", "hs => hs.map(h => h.textContent)")
        assert titles == ["#0", "#1", "#2 reference"]
        assert not errors, errors
