"""Real-model recipes (recipes/qwen*.yaml): they load with the real loader, their batch
arithmetic holds, they fit their devices by vlrl/memory_plan.py, and the numbers written
in docs/real-models.md are the ones that module computes. None of this runs a model: the
recipes target GPUs/NPUs this machine does not have (docs/backends.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vlrl.memory_plan import ACCELERATORS, RECIPES, SHAPES, plan_for_stage, render_tables, rl_plan
from vlrl.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "recipes"
DOC = ROOT / "docs" / "real-models.md"


def _load(fname: str, tmp_path: Path):
    model, data = tmp_path / "ckpt", tmp_path / "dataset"
    model.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    for placeholder in (model / "config.json", data / "train.jsonl", data / "eval.jsonl"):  # what validation looks for
        placeholder.touch()
    return load_recipe(RECIPE_DIR / fname, overrides=[f"model.path={model}", f"data.path={data}"]), model, data


def test_every_real_recipe_is_planned():
    """A new qwen*.yaml must get an entry in memory_plan.RECIPES, or it would go unchecked."""
    on_disk = sorted(p.name for p in RECIPE_DIR.glob("qwen*.yaml"))
    assert on_disk == sorted(RECIPES)


@pytest.mark.parametrize("fname", sorted(RECIPES))
def test_recipe_schema_and_batch_arithmetic(fname, tmp_path):
    recipe, model_dir, data_dir = _load(fname, tmp_path)
    devices = int(re.search(r"-(\d+)(gpu|npu)\.yaml$", fname).group(1))
    kind = "cuda" if fname.endswith("gpu.yaml") else "npu"
    assert recipe.device == kind
    assert recipe.stages["model"].path == str(model_dir)  # the user's checkpoint, given on the command line
    assert recipe.stages["data"].path == str(data_dir)
    rl = recipe.stages["rl"]
    assert rl.rollout.engine == "vllm"
    assert rl.dtype == "bfloat16" and rl.gradient_checkpointing
    assert rl.trainer_ranks == devices == rl.rollout.workers  # one trainer rank and one engine per device
    assert rl.placement == "colocate"
    assert rl.rollout.engine_options["tensor_parallel_size"] == 1
    assert rl.micro_batch_size is not None
    rows = rl.rollout.prompts_per_step * rl.rollout.n
    assert rows % rl.trainer_ranks == 0 and rows % rl.rollout.workers == 0
    mini = rl.algo.mini_batch_size
    assert mini is not None and rows % mini == 0 and mini % rl.trainer_ranks == 0
    assert (mini // rl.trainer_ranks) % rl.micro_batch_size == 0  # every micro-batch full on every rank
    assert rl.rollout.engine_options["max_model_len"] > rl.rollout.max_tokens
    assert not rl.use_reference  # the plan counts no reference model
    if devices > 1:
        assert "sft" not in recipe.stages  # the SFT stage runs on one device; 7B/8B do not fit there
    else:
        assert recipe.stages["sft"].from_ == "model" and rl.from_ == "sft"


@pytest.mark.parametrize("fname", sorted(RECIPES))
def test_recipe_fits_its_device(fname, tmp_path):
    recipe, _, _ = _load(fname, tmp_path)
    shape_key, acc_key = RECIPES[fname]
    planned = 0
    for st in recipe.stages.values():
        if st.kind in ("rl", "sft"):
            plan = plan_for_stage(st, SHAPES[shape_key], ACCELERATORS[acc_key])
            assert plan.fits, f"{fname}: {st.kind} peak {plan.peak:.1f} GiB over budget {plan.budget:.1f} GiB"
            planned += 1
    assert planned >= 1


def test_plan_rejects_a_recipe_that_does_not_fit(tmp_path):
    """The fit check can fail: the 8-GPU 7B recipe on one device, or with vLLM taking 90%."""
    recipe, _, _ = _load("qwen2.5-vl-7b-8gpu.yaml", tmp_path)
    shape, h100 = SHAPES["qwen2.5-vl-7b"], ACCELERATORS["h100"]
    one = recipe.stages["rl"].model_copy(update={"trainer_ranks": 1})
    assert not plan_for_stage(one, shape, h100).fits
    greedy = recipe.stages["rl"].model_copy(deep=True)
    greedy.rollout.engine_options["gpu_memory_utilization"] = 0.9
    assert not plan_for_stage(greedy, shape, h100).fits


def test_plan_arithmetic_by_hand():
    """One plan's components recomputed from the formulas the doc states."""
    s, acc = SHAPES["qwen2.5-vl-7b"], ACCELERATORS["h100"]
    plan = rl_plan(s, acc, ranks=8, micro_batch_rows=4, prompt_tokens=1024, response_tokens=1024, gpu_memory_utilization=0.4,
                   gradient_checkpointing=True, reference=False, rollout_rows_per_engine=64)
    gib = 2**30
    train = plan.phases["train"]
    assert train["trainer fp32 weights+grads+AdamW (16 B/param / ranks)"] == pytest.approx(16 * 8_292_166_656 / 8 / gib)
    assert train["logits (22 B x vocab per response token)"] == pytest.approx(22 * 152064 * 4 * 1024 / gib)
    assert train["FSDP2 root unit gathered (bf16) + its grads (fp32)"] == pytest.approx(6 * s.root_params / gib)
    assert "vLLM share (gpu_memory_utilization x device)" not in train  # asleep while training
    assert plan.phases["rollout"]["vLLM share (gpu_memory_utilization x device)"] == pytest.approx(0.4 * acc.memory_gib)
    assert s.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert s.root_params == 2 * 152064 * 3584 + 676_550_144
    no_gc = rl_plan(s, acc, ranks=8, micro_batch_rows=4, prompt_tokens=1024, response_tokens=1024, gpu_memory_utilization=0.4,
                    gradient_checkpointing=False, reference=True, rollout_rows_per_engine=64)
    assert no_gc.phases["train"]["activations"] > 5 * train["activations (checkpointed)"]
    assert no_gc.phases["rollout"]["reference weights (2 B/param / ranks)"] == pytest.approx(2 * 8_292_166_656 / 8 / gib)
    assert plan.phases["weight sync"]["largest tensor gathered (fp32 embedding)"] == pytest.approx(4 * 152064 * 3584 / gib)
    one = rl_plan(s, acc, ranks=1, micro_batch_rows=1, prompt_tokens=1024, response_tokens=1024, gpu_memory_utilization=0.1,
                  gradient_checkpointing=True, reference=False, rollout_rows_per_engine=8)
    assert one.phases["train"]["autocast bf16 weight copies (2 B/param)"] == pytest.approx(2 * 8_292_166_656 / gib)
    assert not one.fits  # 124 GiB of fp32 trainer state on one device
    assert plan.kv_tokens == int((0.4 * acc.memory_gib - 2 * 8_292_166_656 / gib - 3.0) * gib // s.kv_bytes_per_token)


def test_plan_needs_max_model_len(tmp_path):
    recipe, _, _ = _load("qwen2.5-vl-7b-8gpu.yaml", tmp_path)
    st = recipe.stages["rl"].model_copy(deep=True)
    del st.rollout.engine_options["max_model_len"]
    with pytest.raises(ValueError, match="max_model_len"):
        plan_for_stage(st, SHAPES["qwen2.5-vl-7b"], ACCELERATORS["h100"])


def _meta_model(key: str):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen3VLConfig

    s = SHAPES[key]
    text = dict(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                num_attention_heads=s.hidden // s.head_dim if key.startswith("qwen2.5") else 32, num_key_value_heads=s.kv_heads,
                vocab_size=s.vocab, tie_word_embeddings=s.tied)
    vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate, num_heads=16, out_hidden_size=s.hidden)
    if key.startswith("qwen2.5"):
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=s.tied)
    else:  # three deepstack mergers in both Qwen3-VL sizes (their config.json)
        text["head_dim"] = s.head_dim
        vision["deepstack_visual_indexes"] = [8, 16, 24] if key == "qwen3-vl-8b" else [5, 11, 17]
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=s.tied)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_shape_parameter_counts_match_transformers(key):
    """The plan's parameter counts are what transformers builds from the checkpoints'
    dimensions (3.75B, 8.29B, 4.44B, 8.77B, as the model cards say)."""
    m = _meta_model(key)
    s = SHAPES[key]
    assert sum(p.numel() for p in m.parameters()) == s.params
    assert sum(p.numel() for n, p in m.named_parameters() if ".visual." in f".{n}") == s.vision_params
    layer = m.model.language_model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == pytest.approx(s.layer_params, abs=s.hidden)  # final norm spread over layers


def test_doc_tables_match_the_plan():
    """docs/real-models.md carries `python -m vlrl.memory_plan` output between markers."""
    text = DOC.read_text()
    begin, end = "<!-- memory-plan:begin (python -m vlrl.memory_plan) -->\n", "<!-- memory-plan:end -->"
    assert begin in text and end in text
    written = text.split(begin, 1)[1].split(end, 1)[0]
    assert written == render_tables(RECIPE_DIR), "docs/real-models.md is stale: paste `python -m vlrl.memory_plan` between its markers"


def test_bf16_adamw_drops_small_updates():
    """Why the trainers keep fp32 master weights: bf16
    weights (std 0.02, as in a trained LM) under AdamW at lr 1e-6 barely move, because an
    update below half a bf16 ulp rounds away; fp32 weights all move."""
    torch.manual_seed(0)
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.nn.Parameter((torch.randn(256, 256) * 0.02).to(dtype))
        w0 = w.detach().clone()
        opt = torch.optim.AdamW([w], lr=1e-6, weight_decay=0.0, betas=(0.9, 0.95))
        for _ in range(10):
            w.grad = torch.randn_like(w)
            opt.step()
        moved[dtype] = (w.detach() != w0).float().mean().item()
    assert moved[torch.bfloat16] < 0.05
    assert moved[torch.float32] > 0.99


def test_sft_plan_follows_its_precision_keys(tmp_path):
    """The 3B recipe's SFT fits with bf16 compute and checkpointing; the same stage at
    float32 compute without checkpointing (the keys' defaults) or with 4096-token rows does not."""
    recipe, _, _ = _load("qwen2.5-vl-3b-1gpu.yaml", tmp_path)
    shape, h100 = SHAPES["qwen2.5-vl-3b"], ACCELERATORS["h100"]
    sft = recipe.stages["sft"]
    assert sft.dtype == "bfloat16" and sft.gradient_checkpointing
    plan = plan_for_stage(sft, shape, h100)
    assert plan.fits
    train = plan.phases["train"]
    gib = 2**30
    assert train["fp32 weights+grads+AdamW (16 B/param)"] == pytest.approx(16 * shape.params / gib)
    assert train["autocast bf16 weight copies (2 B/param)"] == pytest.approx(2 * shape.params / gib)
    assert train["logits (16 B x vocab per token)"] == pytest.approx(16 * shape.vocab * 2048 / gib)
    plain = sft.model_copy(update={"dtype": "float32", "gradient_checkpointing": False})
    assert "autocast bf16 weight copies (2 B/param)" not in plan_for_stage(plain, shape, h100).phases["train"]
    assert not plan_for_stage(plain, shape, h100).fits
    long_rows = sft.model_copy(update={"packing": sft.packing.model_copy(update={"max_length": 8192})})
    assert not plan_for_stage(long_rows, shape, h100).fits
