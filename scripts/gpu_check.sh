#!/usr/bin/env bash
# First checks on a CUDA machine (docs/backends.md, "First checks on real hardware"):
#   1. the gpu tests (tests/test_cuda.py: the CPU suite's stage, engine, packing and
#      resume checks rerun on the GPU, Ray's GPU fractions, bf16 beside float32);
#   2. every stage of the tiny recipe on cuda (Ray colocate), at a shortened budget;
#   3. the rollout and packing benches on the device.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default runs/gpu-check; logs and the run land there)
# PY picks the interpreter (default: python3); PART_TIMEOUT caps each part's seconds; ONLY
# (e.g. "recipe bench") runs some parts; GPU_TESTS_K selects tests (pytest -k). Each part
# runs even if an earlier one failed; the exit status is the number of parts that failed.
set -uo pipefail
OUT=${1:-runs/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
failed=0
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
part() {  # part NAME CMD...: run, log to $OUT/NAME.log, print its wall time and status
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "${PART_TIMEOUT:-3600}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi -L || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

if want pytest; then
  part pytest $PY -m pytest -q -m gpu tests/test_cuda.py -s -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"}
  grep -E "passed|failed|error|bf16 engine" "$OUT/pytest.log" | tail -8
fi

# Every stage, a few minutes in all: the same recipe as `make demo`, with fewer steps.
SHORT=(
  device=cuda "run_dir=$OUT/tiny" eval.limit=300
  model.vision_pretrain.steps=300
  pretrain.phases.0.steps=50 pretrain.phases.1.steps=200 pretrain.phases.2.steps=200 pretrain.phases.3.steps=200
)
for s in sft sft_shuffled sft_lowres; do
  SHORT+=("$s.phases.0.steps=10" "$s.phases.1.steps=20" "$s.restore.steps=10")
done
SHORT+=(rl.steps=20)
if want recipe; then
  part recipe $PY -m vlrl.cli run recipes/tiny.yaml "${SHORT[@]}"
  grep -E "stage |all |perception |reasoning |text " "$OUT/recipe.log" | tail -40
fi

if want bench; then
  # The engine's default chunk (256 rows) and all 512 rows at once, beside generate (always all rows).
  part bench_rollout $PY bench/bench_rollout.py --device cuda --prompts 64 --n 8 --rounds 3
  tail -5 "$OUT/bench_rollout.log"
  part bench_rollout_512 $PY bench/bench_rollout.py --device cuda --prompts 64 --n 8 --rounds 3 --max-batch-rows 512
  tail -5 "$OUT/bench_rollout_512.log"
fi
if want bench && [ -d "$OUT/tiny/pretrain/checkpoint" ]; then
  part bench_packing $PY bench/bench_sft_packing.py --device cuda --data "$OUT/tiny/data" --model "$OUT/tiny/pretrain/checkpoint" --rounds 3
  tail -5 "$OUT/bench_packing.log"
fi
echo "gpu check: $failed part(s) failed; logs in $OUT"
exit $failed
