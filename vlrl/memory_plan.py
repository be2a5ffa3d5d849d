"""Device-memory plan of a real-model recipe: the arithmetic behind its batch sizes.

Why a function and not only prose: the numbers in docs/real-models.md are produced by
`render_tables()` and a test compares the doc with it, and another test checks that every
recipe in recipes/ fits its device by this plan, so a recipe edit that breaks the budget
fails CI instead of an 8-GPU job an hour in. It is an estimate (nothing here was measured
on a GPU or an NPU: this project has not run one), built from what our code keeps:

- RL trainer (rlhf/workers.py PolicyTrainer): float32 parameters, float32 gradients and
  float32 AdamW moments whatever the recipe's `dtype` (the compute dtype): 4 + 4 + 8 = 16
  bytes per parameter, divided by the FSDP2 ranks (rlhf/fsdp.py shards every parameter on
  dim 0). With one rank, autocast keeps bf16 copies of the weights it casts during the
  forward: up to 2 B/param more while training. The reference model loads in `dtype`.
- SFT and pretraining trainer (sft/trainer.py): the same float32 master weights, gradients
  and AdamW moments (16 B/param) and autocast copies below float32, on one device.
- FSDP2 units (rlhf/fsdp.py, MixedPrecisionPolicy bf16 / reduce fp32): each decoder layer
  is a unit, gathered in bf16 while it runs (the next one prefetched), its gradient made
  fp32 for the reduce-scatter; the root unit (embeddings, lm_head, the whole vision tower)
  stays gathered from forward to backward: 2 B/param gathered + 4 B/param of gradient.
- Weight sync (PolicyTrainer.packed): one tensor gathered at a time (fp32) and moved to
  host at once, so the device holds at most the largest tensor (the embedding) beside
  the resident state.
- Rollout (rollout/vllm_engine.py): one vLLM engine per device (tensor_parallel_size 1,
  the layout colocate placement gives), holding `gpu_memory_utilization` x device memory
  while it samples and receives weights; colocated on an accelerator the RL stage puts it
  to sleep (level 1: weights to host, KV cache freed) from the end of the rollouts to the
  weight sync, so in the train phase only its fixed overhead stays.
- Activations per token of one decoder layer, bf16, fused attention (no s x s scores),
  SwiGLU MLP, RMSNorm computing in fp32: 20h + 6kv + 8I bytes (norm inputs in fp32 and
  outputs, q/k/v and their rotary copies, attention output, the four I-wide MLP tensors).
  Method as in Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", sec. 4), redone for this block. Gradient checkpointing (per decoder
  layer / vision block, as transformers applies it) keeps only each layer's 2h-byte input
  plus one layer's full activations during its recompute.
- Logits: RL computes them for the response positions only (`logits_to_keep`) and holds
  bf16 logits, their fp32 scaled copy, the suppressed-id copy, logsumexp and entropy
  temporaries at once: about 22 x vocab bytes per response token at the forward peak
  (rlhf/batch.py response_logprobs). SFT computes them for every position: bf16 + fp32
  copy + log-softmax + fp32/bf16 gradients, about 16 x vocab bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of an architecture. `params` and `vision_params` are what
    transformers counts for the architecture (tied embeddings once); tests/test_recipes_real.py
    rebuilds each on the meta device from these dimensions and checks both counts."""

    name: str
    params: int
    vision_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    merge: int = 4  # vision patches per language token (2 x 2 spatial merge)

    @property
    def root_params(self) -> int:
        """FSDP2 root unit: embeddings, lm_head (when untied) and the vision tower."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.vision_params

    @property
    def layer_params(self) -> int:
        return (self.params - self.root_params) // self.layers

    @property
    def kv_bytes_per_token(self) -> int:
        """vLLM KV cache, bf16: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def layer_act_bytes(self) -> int:
        """Activation bytes per token of one decoder layer (see the module docstring)."""
        return 20 * self.hidden + 6 * self.kv_heads * self.head_dim + 8 * self.intermediate

    @property
    def vision_layer_act_bytes(self) -> int:
        """The same per vision patch of one vision block (full multi-head attention: kv = h)."""
        return 26 * self.vision_hidden + 8 * self.vision_intermediate


# Dimensions from each checkpoint's config.json (Hugging Face model cards of
# Qwen/Qwen2.5-VL-{3B,7B}-Instruct and Qwen/Qwen3-VL-{4B,8B}-Instruct).
SHAPES: dict[str, ModelShape] = {
    "qwen2.5-vl-3b": ModelShape("Qwen2.5-VL-3B-Instruct", 3_754_622_976, 668_684_288, 36, 2048, 11008, 2, 128, 151936, True, 32, 1280, 3420),
    "qwen2.5-vl-7b": ModelShape("Qwen2.5-VL-7B-Instruct", 8_292_166_656, 676_550_144, 28, 3584, 18944, 4, 128, 152064, False, 32, 1280, 3420),
    "qwen3-vl-4b": ModelShape("Qwen3-VL-4B-Instruct", 4_437_815_808, 415_347_712, 36, 2560, 9728, 8, 128, 151936, True, 24, 1024, 4096),
    "qwen3-vl-8b": ModelShape("Qwen3-VL-8B-Instruct", 8_767_123_696, 576_388_336, 36, 4096, 12288, 8, 128, 151936, False, 27, 1152, 4304),
}


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_mib: int  # as nvidia-smi / npu-smi report the device's total
    reserve_gib: float = 4.0  # runtime context, collective buffers, allocator fragmentation

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("NVIDIA H100 80GB", 81559),
    "910b": Accelerator("Ascend 910B 64GB", 65536),
}

VLLM_OVERHEAD_GIB = 3.0  # vLLM's profiled activation peak, CUDA/ACL graphs, sampler buffers


@dataclass(frozen=True)
class Plan:
    """Per-device GiB by phase; `peak` is the largest phase."""

    title: str
    accelerator: Accelerator
    phases: dict[str, dict[str, float]]
    kv_tokens: int = 0  # vLLM KV-cache capacity per engine, tokens (0: no engine)
    kv_demand_tokens: int = 0  # a worker's whole step at full length, tokens
    min_kv_tokens: int = 0  # vLLM refuses to start below one max_model_len
    notes: list[str] = field(default_factory=list)

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def budget(self) -> float:
        return self.accelerator.memory_gib - self.accelerator.reserve_gib

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget and self.kv_tokens >= self.min_kv_tokens


def _gib(n: float) -> float:
    return n / GIB


def activations(shape: ModelShape, tokens: int, patches: int, checkpointing: bool) -> float:
    """Decoder-layer and vision-block activations of one micro-batch, bytes."""
    if checkpointing:
        lang = shape.layers * tokens * 2 * shape.hidden + tokens * shape.layer_act_bytes
        vis = shape.vision_layers * patches * 2 * shape.vision_hidden + patches * shape.vision_layer_act_bytes
    else:
        lang = shape.layers * tokens * shape.layer_act_bytes
        vis = shape.vision_layers * patches * shape.vision_layer_act_bytes
    return lang + vis


def rl_plan(
    shape: ModelShape,
    acc: Accelerator,
    *,
    ranks: int,
    micro_batch_rows: int,
    prompt_tokens: int,
    response_tokens: int,
    gpu_memory_utilization: float,
    gradient_checkpointing: bool,
    reference: bool,
    rollout_rows_per_engine: int,
    title: str = "",
) -> Plan:
    """Per-device plan of one RL step with colocated trainer, optional reference and vLLM.

    `prompt_tokens` bounds image plus text tokens of a prompt; vision activations assume
    every prompt token is an image token (the worst case the length bound allows)."""
    p = shape.params
    resident = {"trainer fp32 weights+grads+AdamW (16 B/param / ranks)": _gib(16 * p / ranks)}
    if reference:
        resident["reference weights (2 B/param / ranks)"] = _gib(2 * p / ranks)
    vllm_share = gpu_memory_utilization * acc.memory_gib
    awake = {**resident, "vLLM share (gpu_memory_utilization x device)": vllm_share}

    train = {**resident, "vLLM asleep (fixed overhead)": VLLM_OVERHEAD_GIB}
    if ranks > 1:
        train["FSDP2 root unit gathered (bf16) + its grads (fp32)"] = _gib((2 + 4) * shape.root_params)
        train["FSDP2 decoder layers gathered (2, bf16) + grads (1, fp32)"] = _gib((2 * 2 + 4) * shape.layer_params)
    else:
        train["autocast bf16 weight copies (2 B/param)"] = _gib(2 * p)
    rows = micro_batch_rows
    tokens = rows * (prompt_tokens + response_tokens)
    patches = rows * prompt_tokens * shape.merge
    train["activations" + (" (checkpointed)" if gradient_checkpointing else "")] = _gib(
        activations(shape, tokens, patches, gradient_checkpointing)
    )
    train["logits (22 B x vocab per response token)"] = _gib(22 * shape.vocab * rows * response_tokens)

    sync = {**awake, "largest tensor gathered (fp32 embedding)": _gib(4 * shape.vocab * shape.hidden)}
    phases = {"rollout": awake, "train": train, "weight sync": sync}

    vllm_weights = _gib(2 * p)
    kv_gib = vllm_share - vllm_weights - VLLM_OVERHEAD_GIB
    kv_tokens = max(0, int(kv_gib * GIB // shape.kv_bytes_per_token))
    return Plan(
        title or shape.name,
        acc,
        phases,
        kv_tokens=kv_tokens,
        kv_demand_tokens=rollout_rows_per_engine * (prompt_tokens + response_tokens),
        min_kv_tokens=prompt_tokens + response_tokens,
    )


def sft_plan(
    shape: ModelShape, acc: Accelerator, *, rows: int, tokens_per_row: int, low_precision: bool = True,
    gradient_checkpointing: bool = True, title: str = "",
) -> Plan:
    """One device, no FSDP (the SFT stage has no ranks yet), float32 master weights as in
    RL, autocast copies when computing below float32, logits for every position. Vision
    activations: a quarter of the tokens are image tokens."""
    tokens = rows * tokens_per_row
    p = shape.params
    train = {"fp32 weights+grads+AdamW (16 B/param)": _gib(16 * p)}
    if low_precision:
        train["autocast bf16 weight copies (2 B/param)"] = _gib(2 * p)
    # activations() counts bf16 tensors; float32 compute holds them at twice the size
    train["activations" + (" (checkpointed)" if gradient_checkpointing else "") + ("" if low_precision else " (fp32)")] = _gib(
        activations(shape, tokens, tokens // 4 * shape.merge, gradient_checkpointing) * (1 if low_precision else 2))
    train["logits (16 B x vocab per token)"] = _gib(16 * shape.vocab * tokens)
    return Plan(title or shape.name, acc, {"train": train})


def plan_for_stage(stage, shape: ModelShape, acc: Accelerator) -> Plan:
    """The plan of a recipe's RL or SFT stage (duck-typed on the stage's kind, so this
    module stays free of the recipe schema)."""
    if stage.kind == "rl":
        opts = stage.rollout.engine_options
        max_len = int(opts.get("max_model_len") or 0)
        if max_len <= stage.rollout.max_tokens:
            raise ValueError(f"rollout.engine_options.max_model_len ({max_len}) must exceed rollout.max_tokens ({stage.rollout.max_tokens}) for a plan")
        return rl_plan(
            shape,
            acc,
            ranks=stage.trainer_ranks,
            micro_batch_rows=stage.micro_batch_size,
            prompt_tokens=max_len - stage.rollout.max_tokens,
            response_tokens=stage.rollout.max_tokens,
            gpu_memory_utilization=float(opts.get("gpu_memory_utilization", 0.5)),
            gradient_checkpointing=stage.gradient_checkpointing,
            reference=stage.use_reference,
            rollout_rows_per_engine=stage.rollout.prompts_per_step * stage.rollout.n // stage.rollout.workers,
        )
    if stage.kind == "sft":
        per_row = stage.packing.max_length if stage.packing.enabled else stage.max_length
        return sft_plan(shape, acc, rows=stage.batch_size, tokens_per_row=per_row, low_precision=stage.dtype != "float32",
                        gradient_checkpointing=stage.gradient_checkpointing)
    raise ValueError(f"no memory plan for a {stage.kind!r} stage")


# --------------------------------------------------------------------------- doc tables

# recipe file -> (shape, accelerator): which plan each real-model recipe is checked against.
RECIPES: dict[str, tuple[str, str]] = {
    "qwen2.5-vl-3b-1gpu.yaml": ("qwen2.5-vl-3b", "h100"),
    "qwen2.5-vl-7b-8gpu.yaml": ("qwen2.5-vl-7b", "h100"),
    "qwen2.5-vl-7b-8npu.yaml": ("qwen2.5-vl-7b", "910b"),
    "qwen3-vl-8b-8gpu.yaml": ("qwen3-vl-8b", "h100"),
    "qwen3-vl-8b-8npu.yaml": ("qwen3-vl-8b", "910b"),
}


def plan_table(plan: Plan) -> str:
    """Markdown table: one row per component, one column per phase, totals and budget."""
    names = list(plan.phases)
    comps: list[str] = []
    for ph in names:
        comps += [c for c in plan.phases[ph] if c not in comps]
    lines = ["| GiB per device | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in comps:
        lines.append(f"| {c} | " + " | ".join(f"{plan.phases[ph][c]:.1f}" if c in plan.phases[ph] else "" for ph in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{plan.total(ph):.1f}**" for ph in names) + " |")
    acc = plan.accelerator
    lines.append(f"\nBudget: {acc.memory_gib:.1f} GiB ({acc.name}) - {acc.reserve_gib:.0f} GiB reserve = {plan.budget:.1f} GiB; "
                 f"peak {plan.peak:.1f} GiB in '{plan.peak_phase}': {'fits' if plan.fits else 'DOES NOT FIT'}.")
    if plan.kv_tokens:
        lines.append(f"vLLM KV cache: {plan.kv_tokens:,} tokens per engine; a worker's step at full length needs "
                     f"{plan.kv_demand_tokens:,} ({'all at once' if plan.kv_tokens >= plan.kv_demand_tokens else 'vLLM runs it in waves'}).")
    return "\n".join(lines)


def render_tables(recipes_dir) -> str:
    """The per-recipe tables of docs/real-models.md, from the recipes themselves."""
    from pathlib import Path

    from vlrl.recipe import Recipe, read_recipe_file

    blocks = []
    for fname, (shape_key, acc_key) in RECIPES.items():
        # The stage configs only: the recipes' model and data paths are placeholders, which
        # validation (vlrl/recipe.py validate_recipe) would look for on this machine.
        recipe = Recipe.model_validate(read_recipe_file(Path(recipes_dir) / fname))
        shape, acc = SHAPES[shape_key], ACCELERATORS[acc_key]
        for name, st in recipe.stages.items():
            if st.kind not in ("rl", "sft"):
                continue
            blocks.append(f"#### `{fname}` stage `{name}` ({st.kind})\n\n{plan_table(plan_for_stage(st, shape, acc))}")
    rows = ["#### Why the 7B/8B recipes have no SFT stage: SFT on one device, 1 row x 2048 tokens, bf16 compute, checkpointing\n",
            "| model | device | peak GiB | budget GiB | fits |", "|---|---|---:|---:|---|"]
    for shape_key in ("qwen2.5-vl-7b", "qwen3-vl-8b"):
        for acc_key in ("h100", "910b"):
            pl = sft_plan(SHAPES[shape_key], ACCELERATORS[acc_key], rows=1, tokens_per_row=2048)
            rows.append(f"| {SHAPES[shape_key].name} | {ACCELERATORS[acc_key].name} | {pl.peak:.1f} | {pl.budget:.1f} | {'yes' if pl.fits else 'no'} |")
    blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":  # python -m vlrl.memory_plan [recipes_dir]
    import sys

    sys.stdout.write(render_tables(sys.argv[1] if len(sys.argv) > 1 else "recipes"))
