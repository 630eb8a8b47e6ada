#!/usr/bin/env bash
# The GPU checks, as one prepared run for a lent GPU machine (about 9 minutes), most wanted first: the trainer's step
# speed per precision, the conv ablation, the shipped model's k=5000 evaluation on the GPU, `vae-engine train
# --device cuda` killed once and resumed (30 epochs of the recipe; the full 300 took 4.35 min on an H200), fp32/bf16
# parity at equal epochs, and the engine's GPU rows.
# Every part has its own time limit, so a failure or an overrun in one leaves the others' results; each part's
# output goes to $OUT/log and the results files into $OUT/results.tgz.
#
#     OUT=/tmp/gpu bash bench/gpu_checks.sh                        # on the GPU machine, from the repo root
#     DEVICE=cpu SCALE=tiny OUT=/tmp/gpu bash bench/gpu_checks.sh  # a dry run of the script itself on a CPU
set -u
OUT=${OUT:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-full}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
THREADS=$(nproc)
if [ "$SCALE" = tiny ]; then
  EPOCHS=2 NLL_EVERY=1 SPEED_S=0.3 PARITY_E=1 ABL_E=1 K_EVAL=50 LIMIT="--limit 200" TRAIN_LIMIT="--limit 2000"
else
  EPOCHS=30 NLL_EVERY=10 SPEED_S=1.5 PARITY_E=10 ABL_E=20 K_EVAL=5000 LIMIT="" TRAIN_LIMIT=""
fi
VE="$PY -m vae_engine"
collect() {  # the results so far, into one file (a later part that overruns the whole run loses nothing)
  tar czf "$OUT/results.tgz" --ignore-failed-read bench/results/train_bench.json runs/bench-gpu.json \
    runs/evaluation-shipped-gpu.json runs/recipe-gpu/{config.json,metrics.jsonl,model.safetensors,prior.safetensors,plots} \
    2>/dev/null
}
part() {  # part NAME SECONDS COMMAND...: run with a time limit (SIGINT first, as a user's Ctrl-C), log its time
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS
  timeout -s INT -k 10 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  collect
}
exec > >(tee "$OUT/log") 2>&1

part setup 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true;
  lscpu | grep -E 'Model name|^CPU\(s\)'; $PY -c 'import torch, numba, numpy, onnxruntime as o; print(torch.__version__,
  numba.__version__, numpy.__version__, o.__version__, o.get_available_providers(), torch.cuda.is_available())'"
part speed 60 $PY bench/train_bench.py --speed --device "$DEVICE" --seconds "$SPEED_S" --threads "$THREADS"
# still unmeasured after the H200 session of 2026-12-04: the conv model's NLL at equal epochs (about 2.5 min)
part ablation 190 $PY bench/train_bench.py --ablation --variants "recipe,resnet conv" --device "$DEVICE" \
  --epochs "$ABL_E" --threads "$THREADS"
# the shipped VampPrior model scored on the device (its log p(z) next to the decoder since 2026-12-04), all test images
part "evaluate shipped" 90 $VE evaluate models/mnist-vae --backend torch --device "$DEVICE" --precision fp32 \
  --k "$K_EVAL" $LIMIT --json runs/evaluation-shipped-gpu.json
RECIPE=(--out runs/recipe-gpu --hidden 500,500 --latent-dim 50 --prior vamp --pseudo-inputs 500 --objective dreg
        --k 5 --batch-size 500 --lr 1e-3 --lr-schedule cosine --precision auto --device "$DEVICE" --epochs "$EPOCHS"
        --nll-every "$NLL_EVERY" $TRAIN_LIMIT)
part "recipe (killed)" 25 $VE train "${RECIPE[@]}"
part "recipe (resumed)" 60 $VE train "${RECIPE[@]}" --resume
part parity 50 $PY bench/train_bench.py --parity --device "$DEVICE" --objective dreg --k 5 --batch-size 500 \
  --epochs "$PARITY_E" --seeds 0,1 --threads "$THREADS"
GPU_ROWS=torch-cuda,torch-cuda-bf16,torch-cuda-fp16
[ "$DEVICE" = cpu ] && GPU_ROWS=torch
part bench 55 $VE bench models/mnist-vae --backends "torch,$GPU_ROWS" --batches 1,1024 --ops decode,reconstruct \
  --threads "$THREADS" --json runs/bench-gpu.json
ls -la "$OUT"
