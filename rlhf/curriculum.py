"""The RL prompt curriculum: which train records are prompts at each step.

Prompt number c of the stage (c counts every prompt drawn, across steps and dynamic
sampling rounds) is a pure function of (seed, c, step): the step picks the difficulty
band of the schedule, a generator seeded by (seed, c) picks perception or not (with
`perception_share`) and then a record of that part of the pool. So the sampler's whole
state is the cursor c, which the checkpoint saves; resume neither repeats nor skips a
prompt.

Departure from common curricula (e.g. Kimi k1.5's difficulty-weighted sampling): the
band is a step schedule set in the recipe, not adapted to measured pass rates; DAPO's
dynamic sampling (rlhf.batching) already drops the groups that are all right or all wrong.
"""

from __future__ import annotations

import numpy as np

from vlrl.data.records import Record
from vlrl.data.synth import select_indices
from vlrl.errors import RecipeError
from vlrl.recipe_rl import CurriculumSpec


class PromptCurriculum:
    def __init__(self, records: list[Record], spec: CurriculumSpec, seed: int, where: str = "curriculum") -> None:
        self.records, self.spec, self.seed = records, spec, seed
        points = spec.schedule or []
        self._bands = [(p.from_step, tuple(p.difficulty)) for p in points] or [(0, tuple(spec.select.difficulty))]
        self._pools: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        for _, band in self._bands:  # fail at start, not at step 40, if a band has no records
            perc, other = self._pool(band)
            if not perc and not other:
                raise RecipeError(f"{where}: no train records match {spec.select.model_dump(exclude_none=True)} with difficulty {list(band)}")
            if spec.perception_share is not None and (
                (spec.perception_share > 0 and not perc) or (spec.perception_share < 1 and not other)
            ):
                missing = "perception" if not perc else "non-perception"
                raise RecipeError(f"{where}.perception_share: {spec.perception_share} but no {missing} records in difficulty {list(band)}")

    def reachable(self) -> list[int]:
        """Indices of every record some band of the schedule can draw."""
        return sorted({i for _, band in self._bands for part in self._pool(band) for i in part})

    def band(self, step: int) -> tuple[int, int]:
        """The difficulty band that applies at `step`."""
        cur = self._bands[0][1]
        for start, band in self._bands:
            if step >= start:
                cur = band
        return cur

    def _pool(self, band: tuple[int, int]) -> tuple[list[int], list[int]]:
        if band not in self._pools:
            sel = self.spec.select
            idx = select_indices(self.records, families=sel.families, tasks=sel.tasks, difficulty=band)
            perc = [i for i in idx if self.records[i].family == "perception"]
            other = [i for i in idx if self.records[i].family != "perception"]
            self._pools[band] = (perc, other)
        return self._pools[band]

    def draw(self, cursor: int, count: int, step: int) -> list[int]:
        """Record indices of prompts cursor .. cursor + count - 1 at `step`."""
        perc, other = self._pool(self.band(step))
        weights = self.spec.select.weights
        out = []
        for c in range(cursor, cursor + count):
            rng = np.random.default_rng([self.seed, c])
            share = self.spec.perception_share
            if share is None:  # as in the pool (or the family weights of select)
                pool = perc + other
                if weights:
                    w = np.array([weights.get(self.records[i].family, 0.0) for i in pool], dtype=np.float64)
                    out.append(pool[int(rng.choice(len(pool), p=w / w.sum()))] if w.sum() > 0 else pool[int(rng.integers(len(pool)))])
                    continue
                out.append(pool[int(rng.integers(len(pool)))])
                continue
            part = perc if (rng.random() < share and perc) or not other else other
            out.append(part[int(rng.integers(len(part)))])
        return out
