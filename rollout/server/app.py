"""The inspection server: a FastAPI app over one run directory (`vlrl serve --run RUN_DIR`).

Read side (JSON under /api, schema at /openapi.json): stages, per-step
summaries, filtered and sorted rollout listings, groups side by side, metrics and curves,
eval reports, images from the run directory. Live side: POST /api/live/generate samples a
checkpoint of the run and scores the samples with the run's reward stack. The web page
(`static/`, plain HTML and JS modules, no build step) is served at /.

Errors a user can cause are 4xx with a `detail` message: a missing stage or file 404, a
path outside the run directory 403, a bad filter 400/422, an ask over the limits 413,
a busy generator 429. See `rollout.server.security` for the token and Host checks.
"""

from __future__ import annotations

import json
import math
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import Field, ValidationError

from rollout.server import curves
from rollout.server.live import Busy, LiveSampler, TooLarge
from rollout.server.models import (
    CheckpointOut,
    CurveOut,
    CurvesOut,
    ErrorOut,
    GroupSummary,
    GroupView,
    Limits,
    LimitsOut,
    LiveRequest,
    LiveResponse,
    MetricsOut,
    RolloutPage,
    RolloutRow,
    RunOut,
    StageOut,
    StepSummary,
    StoreInfo,
)
from rollout.server.rundir import NoSuchStage, OutsideRunDir, RunDir, resolve_inside
from rollout.server.security import Guard
from rollout.server.svgplot import line_chart
from rollout.store import COLUMNS, RolloutQuery, RolloutStatus, StoreError
from vlrl.errors import VlrlError

# SQLite integers are 64-bit: bound every integer the client sends, so none overflows a query.
Int = Annotated[int, Query(ge=0, le=2**62)]
STATIC = Path(__file__).parent / "static"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
# Documented on every operation: the guard's 401/403/413 and our one-line 422 (in place of
# FastAPI's list-shaped validation error), so the schema says what clients really get.
ERRORS = {c: {"model": ErrorOut} for c in (400, 401, 403, 404, 413, 422)}
STAGE_ERRORS = {c: {"model": ErrorOut} for c in (400, 401, 403, 404, 409, 413, 422)}


def _range(lo: float | None, hi: float | None, name: str) -> tuple[float | None, float | None] | None:
    """SQLite binds NaN as NULL, and a comparison with NULL matches no row: a NaN bound
    would answer an empty page instead of saying the ask is meaningless."""
    for which, v in (("min", lo), ("max", hi)):
        if v is not None and math.isnan(v):
            raise VlrlError(f"{name}_{which}={v}: not a number")
    return None if lo is None and hi is None else (lo, hi)


def _parse_component_filters(specs: list[str]) -> dict[str, tuple[float | None, float | None]]:
    """`name:lo:hi` (either bound may be empty) -> {name: (lo, hi)}; the name may hold ':'."""
    out = {}
    for spec in specs:
        name, sep1, rest = spec.rpartition(":")
        name, sep2, lo = name.rpartition(":")
        if not (sep1 and sep2 and name):
            raise VlrlError(f"comp={spec!r}: expected name:min:max (either bound may be empty)")
        try:
            bounds = (float(lo) if lo.strip() else None, float(rest) if rest.strip() else None)
        except ValueError as e:
            raise VlrlError(f"comp={spec!r}: bounds must be numbers ({e})") from e
        if any(b is not None and math.isnan(b) for b in bounds):
            raise VlrlError(f"comp={spec!r}: a bound is not a number (nan)")
        out[name] = bounds
    return out


def create_app(run_dir: str | Path, *, token: str | None = None, limits: Limits = Limits(), device: str = "auto") -> Guard:
    """The ASGI app (the FastAPI app wrapped in the security guard; `.app` is the FastAPI one)."""
    check_token(token)
    run = RunDir(run_dir)
    live = LiveSampler(run, limits, device=device)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        live.close()
        run.close()

    api = FastAPI(
        title="vlrl rollout inspector",
        version="1",
        description="Browse a run's rollouts, rewards and curves; sample its checkpoints live.",
        lifespan=lifespan,
        # FastAPI's /docs and /redoc load their scripts from a CDN: blank offline, and a third
        # party's code in the inspector's origin otherwise. The schema itself stays.
        docs_url=None,
        redoc_url=None,
    )
    api.state.run = run

    def err(status: int, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=status)

    @api.exception_handler(NoSuchStage)
    async def _404(_r: Request, e: Exception):
        return err(404, e)

    @api.exception_handler(OutsideRunDir)
    async def _403(_r: Request, e: Exception):
        return err(403, e)

    @api.exception_handler(TooLarge)
    async def _413(_r: Request, e: Exception):
        return err(413, e)

    @api.exception_handler(Busy)
    async def _429(_r: Request, e: Exception):
        return err(429, e)

    @api.exception_handler(VlrlError)
    @api.exception_handler(StoreError)
    async def _400(_r: Request, e: Exception):
        return err(400, e)

    @api.exception_handler(ValidationError)
    async def _422(_r: Request, e: Exception):
        return err(422, e)

    @api.exception_handler(OverflowError)
    async def _400_overflow(_r: Request, e: Exception):
        return err(400, VlrlError(f"a number in the request is out of range ({e})"))

    @api.exception_handler(sqlite3.OperationalError)
    async def _409(_r: Request, e: Exception):
        return err(409, VlrlError(f"the rollout store is busy or unreadable right now ({e}); retry"))

    # ------------------------------------------------------------------ run and stages

    @api.get("/api/run", response_model=RunOut, responses=ERRORS)
    def get_run() -> RunOut:
        """The run's name, its stages and what each holds, and the server's limits."""
        lim = LimitsOut(**{k: getattr(limits, k) for k in LimitsOut.model_fields})
        return RunOut(name=run.name, stages=[StageOut(**s.__dict__) for s in run.stages()], limits=lim)

    @api.get("/api/stages/{stage}/store", response_model=StoreInfo, responses=STAGE_ERRORS)
    def store_info(stage: str) -> StoreInfo:
        """Steps, tasks and reward components of a stage's rollout store: the filter choices."""
        s = run.store(stage)
        comps = s.component_names()
        return StoreInfo(stage=stage, count=s.count(), steps=s.steps(), tasks=s.tasks(), components=comps, sort_keys=[*COLUMNS, *comps])

    @api.get("/api/stages/{stage}/steps", response_model=list[StepSummary], responses=STAGE_ERRORS)
    def steps(stage: str) -> list[StepSummary]:
        """Per-step totals: rollouts, groups, reward and length means, truncations, component means."""
        return run.store(stage).step_summaries()

    @api.get("/api/stages/{stage}/rollouts", response_model=RolloutPage, responses=STAGE_ERRORS)
    def rollouts(
        stage: str,
        step: Int | None = None,
        step_min: Int | None = None,
        step_max: Int | None = None,
        task: Annotated[list[str] | None, Query(max_length=100)] = None,
        difficulty: Annotated[list[Annotated[int, Field(ge=1, le=5)]] | None, Query(max_length=5)] = None,
        status: RolloutStatus | None = None,
        policy_version: Int | None = None,
        group_id: str | None = None,
        record_id: str | None = None,
        reward_min: float | None = None,
        reward_max: float | None = None,
        advantage_min: float | None = None,
        advantage_max: float | None = None,
        length_min: Int | None = None,
        length_max: Int | None = None,
        comp: Annotated[list[str] | None, Query(max_length=20, description="component filter name:min:max, repeatable")] = None,
        sort: str = Query("id", max_length=200, description="a column or a reward component (see /store sort_keys)"),
        desc: bool = False,
        limit: int = Query(50, ge=1, le=10_000),
        offset: int = Query(0, ge=0, le=10**12),
        count: bool = Query(True, description="also count every matching row (total)"),
    ) -> RolloutPage:
        """Rollouts matching every given filter, sorted, one page."""
        if limit > limits.max_page:
            raise TooLarge(f"limit={limit}: at most {limits.max_page} rows per page")
        s = run.store(stage)
        q = RolloutQuery(
            step=step,
            steps=_range(step_min, step_max, "step"),
            task=task if task else None,
            difficulty=difficulty if difficulty else None,
            status=status,
            policy_version=policy_version,
            group_id=group_id,
            record_id=record_id,
            total_reward=_range(reward_min, reward_max, "reward"),
            advantage=_range(advantage_min, advantage_max, "advantage"),
            length=_range(length_min, length_max, "length"),
            components=_parse_component_filters(comp or []),
            sort_by=sort,
            descending=desc,
            limit=limit,
            offset=offset,
        )
        rows = s.query(q)
        total = s.count(q.model_copy(update={"limit": 1, "offset": 0})) if count else None
        return RolloutPage(total=total, offset=offset, limit=limit, rows=rows)

    @api.get("/api/stages/{stage}/rollouts/{rollout_id}", response_model=RolloutRow, responses=STAGE_ERRORS)
    def rollout(stage: str, rollout_id: Annotated[int, PathParam(ge=0, le=2**62)]) -> RolloutRow:
        """One rollout with its prompt and response."""
        row = run.store(stage).get(rollout_id)
        if row is None:
            raise NoSuchStage(f"stage {stage!r} has no rollout {rollout_id}")
        return row

    @api.get("/api/stages/{stage}/groups", response_model=list[GroupSummary], responses=STAGE_ERRORS)
    def groups(stage: str, step: Int) -> list[GroupSummary]:
        """One summary per group of a step (reward spread, advantage range, all-equal groups)."""
        return run.store(stage).groups(step)

    @api.get("/api/stages/{stage}/groups/{group_id}", response_model=GroupView, responses=STAGE_ERRORS)
    def group(stage: str, group_id: str, step: Int | None = None) -> GroupView:
        """All responses to one prompt, side by side (the first step that has the group when no step is given)."""
        rows = run.store(stage).group(group_id, step)
        if not rows:
            raise NoSuchStage(f"stage {stage!r} has no group {group_id!r}" + (f" at step {step}" if step is not None else ""))
        rows = [r for r in rows if r.step == rows[0].step]
        first = rows[0]
        rewards = [r.total_reward for r in rows]
        mean = sum(rewards) / len(rewards)
        return GroupView(
            group_id=group_id,
            step=first.step,
            record_id=first.record_id,
            task=first.task,
            difficulty=first.difficulty,
            prompt=first.prompt,
            images=first.images,
            answer=first.answer,
            components=sorted({k for r in rows for k in r.components}),
            reward_mean=mean,
            reward_std=(sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5,
            samples=rows,
        )

    # ------------------------------------------------------------------ metrics, curves, eval

    @api.get("/api/stages/{stage}/metrics", response_model=MetricsOut, responses=STAGE_ERRORS)
    def metrics(stage: str) -> MetricsOut:
        """metrics.jsonl rows (last write per step) and the numeric metric names."""
        rows = run.metrics(stage)
        return MetricsOut(keys=curves.numeric_keys(rows), rows=rows)

    @api.get("/api/stages/{stage}/curves", response_model=CurvesOut, responses=STAGE_ERRORS)
    def stage_curves(stage: str) -> CurvesOut:
        """Per-step series from the rollout store (reward, length, components) and every numeric metric."""
        return CurvesOut(curves={k: CurveOut(x=x, y=y) for k, (x, y) in _all_curves(stage).items()})

    @api.get("/api/stages/{stage}/plot.svg", responses=STAGE_ERRORS | {200: {"content": {"image/svg+xml": {}}}})
    def plot(
        stage: str,
        key: Annotated[list[str], Query(min_length=1, max_length=10, description="curve names (see /curves)")],
        title: str = Query("", max_length=200),
    ) -> Response:
        """A line chart of the named curves, as SVG."""
        have = _all_curves(stage)
        series = [(k, *have[k]) for k in key if k in have]
        return Response(line_chart(series, title=title), media_type="image/svg+xml", headers={"cache-control": "no-store"})

    curve_cache: dict[str, tuple[tuple, dict[str, curves.Curve]]] = {}

    def _all_curves(stage: str) -> dict[str, curves.Curve]:
        """Recomputed only when the store or metrics.jsonl changed: the page asks for
        several plots per poll, and per-step summaries scan the whole store."""
        sdir = run.stage_dir(stage)
        has_store = sdir.joinpath("rollouts.sqlite").is_file()
        mpath = sdir / "metrics.jsonl"
        mstat = mpath.stat() if mpath.is_file() else None
        key = (run.store(stage).count() if has_store else -1, mstat and (mstat.st_mtime_ns, mstat.st_size))
        hit = curve_cache.get(stage)
        if hit is not None and hit[0] == key:
            return hit[1]
        out: dict[str, curves.Curve] = {}
        if has_store:
            out.update(curves.store_curves(run.store(stage)))
        rows = run.metrics(stage)
        for k in curves.numeric_keys(rows):
            out[k] = curves.metric_curve(rows, k)
        curve_cache[stage] = (key, out)
        return out

    @api.get("/api/stages/{stage}/eval", responses=STAGE_ERRORS)
    def eval_report(stage: str) -> dict:
        """The stage's eval.json (accuracy overall, by family, task and difficulty)."""
        data = run.eval(stage)
        if data is None:
            raise NoSuchStage(f"stage {stage!r} has no eval.json yet")
        return data

    # ------------------------------------------------------------------ files

    @api.get("/api/files/{path:path}", responses={**ERRORS, 200: {"content": {k: {} for k in set(IMAGE_TYPES.values())}}})
    def files(path: str) -> FileResponse:
        """An image of the run (paths as the rollouts list them); nothing outside the run directory."""
        target = resolve_inside(run.root, path)
        media = IMAGE_TYPES.get(target.suffix.lower())
        if media is None:
            raise OutsideRunDir(f"path {path!r}: only images ({', '.join(sorted(IMAGE_TYPES))}) are served")
        if not target.is_file():
            raise NoSuchStage(f"no file {path!r} in the run directory")
        return FileResponse(target, media_type=media)

    # ------------------------------------------------------------------ live

    @api.get("/api/checkpoints", response_model=list[CheckpointOut], responses=ERRORS)
    def checkpoints() -> list[CheckpointOut]:
        """Stages whose checkpoint the live side can load."""
        return [CheckpointOut(stage=s.name, path=f"{s.name}/checkpoint") for s in run.stages() if s.checkpoint]

    @api.post("/api/live/generate", response_model=LiveResponse, responses=ERRORS | {429: {"model": ErrorOut}})
    def live_generate(req: LiveRequest) -> LiveResponse:
        """Sample `n` responses from a checkpoint for a prompt (and image) and score each with the run's reward stack."""
        return live.generate(req)

    # ------------------------------------------------------------------ page

    @api.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"cache-control": "no-store"})

    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.exception_handler(RequestValidationError)
    async def _422_request(_r: Request, e: Exception):
        return JSONResponse({"detail": _validation_message(e)}, status_code=422)

    guard = Guard(api, token=token, max_body_bytes=limits.max_body_bytes)
    guard.api = api  # for tests and the OpenAPI dump
    return guard


def _validation_message(e) -> str:
    """One line per invalid field: 'query.limit: Input should be less than or equal to 10000'."""
    parts = []
    for item in e.errors():
        where = ".".join(str(x) for x in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, device: str = "auto", limits: Limits = Limits()) -> None:
    """Run the server until interrupted; refuses a non-loopback address without a token."""
    import uvicorn

    from rollout.server.security import is_loopback

    if not is_loopback(host) and not token:
        raise VlrlError(f"--host {host}: serving beyond this machine needs --token (e.g. --token $(python -c 'import secrets; print(secrets.token_urlsafe(24))'))")
    app = create_app(run_dir, token=token, limits=limits, device=device)
    shown = f"[{host}]" if ":" in host else host
    print(f"vlrl inspector: http://{shown}:{port}/" + (f"?token={token}" if token else "") + f"  (run {Path(run_dir).resolve()})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def check_token(token: str | None) -> None:
    """Tokens travel in a cookie and a query string: URL-safe characters, 16 or more."""
    if token is None:
        return
    ok = len(token) >= 16 and all(c.isascii() and (c.isalnum() or c in "-_.~") for c in token)
    if not ok:
        raise VlrlError("--token: use 16 or more characters from A-Z a-z 0-9 - _ . ~ (secrets.token_urlsafe() gives one)")


def openapi_json(run_dir: str | Path) -> str:
    return json.dumps(create_app(run_dir).api.openapi(), indent=2)
