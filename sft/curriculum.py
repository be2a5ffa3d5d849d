"""The collaborative curriculum as data: each phase's sampling mixture, and the record stream.

MindGPT-4ov's collaborative curriculum injects ___domain skill phase by phase and then
restores general skill. Here a phase's mixture is its own selection (share
1 - general - perception) plus replayed text and perception records; the optional
`restore` phase draws mostly general data, the rest from the union of the phases'
selections. `curriculum: false` keeps every phase's length and optimizer but gives
every phase the same mixture: all phases' mixtures weighted by their steps, i.e. the
same expected data in shuffled order (the ablation).

As in the paper, a phase may draw its own selection from a corpus of its own (`data:`
on the phase); the records of every corpus the stage reads are concatenated (the
stage's data first), so a phase's selection is a range of that list and replay
always comes from the stage's data. Without `data:` phases are slices of one dataset
chosen by family, task and difficulty.

The stream is a pure function of (seed, phase, position): position p of a phase is
draw p % C of the sampler's batch p // C, so the consumed-data tracker is a cursor.
"""

from __future__ import annotations

from dataclasses import dataclass

from sft.pretrain import phase_pool
from sft.sampler import BatchSampler
from vlrl.data.records import Record
from vlrl.data.synth import select_indices
from vlrl.errors import VlrlError
from vlrl.recipe_base import OptimSpec
from vlrl.recipe_sft import ReplaySpec, SftStage


@dataclass
class PhasePlan:
    name: str
    steps: int
    optim: OptimSpec
    entries: list[int]  # record indices (a record may appear in several parts)
    weights: list[float]  # sampling probability per entry, summing to 1
    shares: dict[str, float]  # part name -> share, for the log


def mixture(parts: list[tuple[str, list[int], list[float] | None, float]], where: str) -> tuple[list[int], list[float]]:
    """Entries and weights of a mixture of parts (name, indices, weights within the part or
    None for uniform, share of the whole). Parts with share 0 are left out."""
    entries: list[int] = []
    weights: list[float] = []
    total = sum(share for *_, share in parts)
    if total <= 0:
        raise VlrlError(f"{where}: the data mixture has no weight")
    for name, idx, w, share in parts:
        if share <= 0:
            continue
        if not idx:
            raise VlrlError(f"{where}: the {name} part (share {share:g}) matches no training records")
        w = w if w is not None else [1.0] * len(idx)
        s = sum(w)
        if s <= 0:
            raise VlrlError(f"{where}: the {name} part has zero total weight (check select.weights)")
        entries.extend(idx)
        weights.extend(share / total * x / s for x in w)
    return entries, weights


def _replay_parts(records: list[Record], replay: ReplaySpec | tuple[float, float]) -> list[tuple[str, list[int], None, float]]:
    general, perception = (replay.general, replay.perception) if isinstance(replay, ReplaySpec) else replay
    return [
        ("general (text) replay", select_indices(records, families=["text"]), None, general),
        ("perception replay", select_indices(records, families=["perception"]), None, perception),
    ]


def _pool_in(records: list[Record], span: tuple[int, int], select) -> tuple[list[int], list[float] | None]:
    """phase_pool over records[start:stop], as indices into the whole list."""
    start, stop = span
    idx, w = phase_pool(records[start:stop], select)
    return [start + i for i in idx], w


def build_plan(records: list[Record], cfg: SftStage, where: str, spans: list[tuple[int, int]] | None = None,
               main: int | None = None) -> list[PhasePlan]:
    """Every phase's mixture, restore included, with curriculum on or off.

    spans: per phase, the [start, stop) range of `records` its selection draws from (its
    own corpus; default: all of them). main: how many leading records are the stage's own
    data, which replay draws from (default: all)."""
    spans = spans or [(0, len(records))] * len(cfg.phases)
    main_records = records[: len(records) if main is None else main]
    plans = []
    for i, ph in enumerate(cfg.phases):
        replay = ph.replay or cfg.replay
        idx, w = _pool_in(records, spans[i], ph.select)
        own = 1.0 - replay.general - replay.perception
        parts = [(f"phase {ph.name!r} selection", idx, w, own), *_replay_parts(main_records, replay)]
        entries, weights = mixture(parts, f"{where}.phases.{i}")
        shares = {"own": own, "general": replay.general, "perception": replay.perception}
        plans.append(PhasePlan(ph.name, ph.steps, ph.optim or cfg.optim, entries, weights, shares))
    if cfg.restore is not None:
        rs = cfg.restore
        union = sorted({i for ph, span in zip(cfg.phases, spans) for i in _pool_in(records, span, ph.select)[0]})
        own = 1.0 - rs.general - rs.perception
        parts = [("curriculum union", union, None, own), *_replay_parts(main_records, (rs.general, rs.perception))]
        entries, weights = mixture(parts, f"{where}.restore")
        plans.append(PhasePlan("restore", rs.steps, rs.optim or cfg.optim, entries, weights, {"own": own, "general": rs.general, "perception": rs.perception}))
    if not cfg.curriculum:
        plans = _shuffled(plans)
    return plans


def _shuffled(plans: list[PhasePlan]) -> list[PhasePlan]:
    """Every phase draws from the step-weighted mixture of all phases' data."""
    total = sum(p.steps for p in plans)
    entries = [e for p in plans for e in p.entries]
    weights = [w * p.steps / total for p in plans for w in p.weights]
    shares = {k: sum(p.shares[k] * p.steps / total for p in plans) for k in ("own", "general", "perception")}
    return [PhasePlan(p.name, p.steps, p.optim, entries, weights, shares) for p in plans]


def family_shares(records: list[Record], plan: PhasePlan) -> dict[str, float]:
    """Expected share of each family in the phase's batches (for the log and tests)."""
    out: dict[str, float] = {}
    for e, w in zip(plan.entries, plan.weights):
        out[records[e].family] = out.get(records[e].family, 0.0) + w
    return out


class RecordStream:
    """Position p of a phase's stream -> record index; a pure function of (seed, phase, p)."""

    CHUNK = 256

    def __init__(self, plan: PhasePlan, *, seed: int, phase: int):
        self.entries = plan.entries
        self.sampler = BatchSampler(len(plan.entries), self.CHUNK, seed=seed, phase=phase, weights=plan.weights)
        self._chunk: tuple[int, list[int]] = (-1, [])

    def __getitem__(self, p: int) -> int:
        k, j = divmod(p, self.CHUNK)
        if self._chunk[0] != k:
            self._chunk = (k, self.sampler.batch(k))
        return self.entries[self._chunk[1][j]]
