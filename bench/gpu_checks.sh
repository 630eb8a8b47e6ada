#!/usr/bin/env bash
# The GPU checks, as one prepared run for a lent GPU machine, each part with its own time limit: the engine's GPU
# rows in `vae-engine bench`, a profile of the shipped model's k=5000 evaluation on the GPU and the whole test set
# in fp32 and bf16, the conv ablation, the trainer's step speed per precision, `vae-engine train --device cuda`
# killed once and resumed (30 epochs of the recipe; the full 300 took 4.35 min on an H200) and fp32/bf16 parity.
# PARTS picks and orders the parts (default: all, in the order below; a session with little device time names the
# ones it needs). A failure or an overrun in one part leaves the others' results; output goes to $OUT/log and the
# results files into $OUT/results.tgz.
#
#     OUT=/tmp/gpu bash bench/gpu_checks.sh                        # on the GPU machine, from the repo root
#     PARTS="bench evaluate" OUT=/tmp/gpu bash bench/gpu_checks.sh # some parts only
#     DEVICE=cpu SCALE=tiny OUT=/tmp/gpu bash bench/gpu_checks.sh  # a dry run of the script itself on a CPU
set -u
OUT=${OUT:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-full}
PARTS=${PARTS:-"bench evaluate evalprofile ablation speed recipe parity"}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
THREADS=$(nproc)
if [ "$SCALE" = tiny ]; then
  EPOCHS=2 NLL_EVERY=1 SPEED_S=0.3 PARITY_E=1 ABL_E=1 K_EVAL=50 LIMIT="--limit 200" TRAIN_LIMIT="--limit 2000"
  PROFILE_N=20
else
  EPOCHS=30 NLL_EVERY=10 SPEED_S=1.5 PARITY_E=10 ABL_E=20 K_EVAL=5000 LIMIT="" TRAIN_LIMIT="" PROFILE_N=1000
fi
VE="$PY -m vae_engine"
collect() {  # the results so far, into one file (a later part that overruns the whole run loses nothing)
  tar czf "$OUT/results.tgz" --ignore-failed-read bench/results/train_bench.json runs/bench-gpu.json \
    runs/evaluation-shipped-gpu-*.json runs/recipe-gpu/{config.json,metrics.jsonl,model.safetensors,prior.safetensors,plots} \
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

bench() {  # the engine's GPU rows beside torch on the CPU, with the per-call overhead over the raw runtime at batch 1
  local rows=torch-cuda,torch-cuda-bf16,torch-cuda-fp16
  [ "$DEVICE" = cpu ] && rows=torch
  part bench 60 $VE bench models/mnist-vae --backends "torch,$rows" --batches 1,1024 --ops decode,reconstruct \
    --threads "$THREADS" --json runs/bench-gpu.json
}
evaluate() {  # the shipped VampPrior model scored on the device: where the time goes, then all test images
  part "profile evaluate" 60 $PY -c "import cProfile, pstats, sys
from vae_engine.jobs.evaluate import evaluate_model
cProfile.run('r = evaluate_model(\"models/mnist-vae\", k=$K_EVAL, limit=$PROFILE_N, device=\"$DEVICE\", '
             'precision=\"fp32\", threads=$THREADS)', '/tmp/eval.prof')
print({key: r[key] for key in ('n', 'seconds', 'test_nll', 'path')}, r['work'])
pstats.Stats('/tmp/eval.prof').sort_stats('tottime').print_stats(25)"
  for precision in fp32 bf16; do
    part "evaluate shipped $precision" 120 $VE evaluate models/mnist-vae --backend torch --device "$DEVICE" \
      --precision "$precision" --k "$K_EVAL" $LIMIT --json "runs/evaluation-shipped-gpu-$precision.json"
  done
}
evalprofile() {  # chunk sizes and a torch.profiler table of one chunk: what bounds the evaluation on the device
  local n=2000
  [ "$SCALE" = tiny ] && n=20
  part "evaluation profile" 150 $PY bench/gpu_eval_profile.py "$DEVICE" "$n" "$K_EVAL"
}
ablation() {  # the conv model's NLL at equal epochs (about 2.5 min; unmeasured until now)
  part ablation 190 $PY bench/train_bench.py --ablation --variants "recipe,resnet conv" --device "$DEVICE" \
    --epochs "$ABL_E" --threads "$THREADS"
}
speed() {
  part speed 60 $PY bench/train_bench.py --speed --device "$DEVICE" --seconds "$SPEED_S" --threads "$THREADS"
}
recipe() {  # killed once, as a user's Ctrl-C, then resumed
  local args=(--out runs/recipe-gpu --hidden 500,500 --latent-dim 50 --prior vamp --pseudo-inputs 500
              --objective dreg --k 5 --batch-size 500 --lr 1e-3 --lr-schedule cosine --precision auto
              --device "$DEVICE" --epochs "$EPOCHS" --nll-every "$NLL_EVERY" $TRAIN_LIMIT)
  part "recipe (killed)" 25 $VE train "${args[@]}"
  part "recipe (resumed)" 60 $VE train "${args[@]}" --resume
}
parity() {
  part parity 50 $PY bench/train_bench.py --parity --device "$DEVICE" --objective dreg --k 5 --batch-size 500 \
    --epochs "$PARITY_E" --seeds 0,1 --threads "$THREADS"
}

part setup 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true;
  lscpu | grep -E 'Model name|^CPU\(s\)'; $PY -c 'import torch, numba, numpy, onnxruntime as o; print(torch.__version__,
  numba.__version__, numpy.__version__, o.__version__, o.get_available_providers(), torch.cuda.is_available())'"
for name in $PARTS; do
  "$name"
done
ls -la "$OUT"
