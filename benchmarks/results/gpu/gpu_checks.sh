#!/usr/bin/env bash
# The GPU checks of one session, in one call (the device tool lends a GPU machine for minutes):
# the bench, the CUDA tests, and real epochs of train_flow on CIFAR-10-sized data through
# benchmarks.overhead. Run from the repository root on a machine whose python3 has torch; the rest
# of the project's packages come from wheels in .whl (see ../shared or the device README).
#     OUT=/tmp/gpu bash benchmarks/results/gpu/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu-checks}
BUDGET=${BUDGET:-570}  # seconds for the whole script; the flow run gets what is left
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false WANDB_MODE=disabled
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oE '[HAL][0-9]+S?' | head -1 | tr 'A-Z' 'a-z')
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm --format=csv
    python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    fi
} > "$OUT/env.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import prefect, wandb, pydantic_settings, torch_fidelity; print('prefect', prefect.__version__, 'wandb', wandb.__version__)" >> "$OUT/env.txt" 2>&1
echo "setup done at $(elapsed) s: $(tail -1 "$OUT/env.txt")"

# CIFAR-10-sized data in the official format (50,000 training images), written in the background.
PYTHONPATH=$PYTHONPATH:tests python3 -c "from tiny_run import write_cifar10; write_cifar10('/tmp/cifar', images_per_batch=10000)" &
writer=$!

timeout 230 python3 -m benchmarks.speed --device cuda --json "$OUT/${gpu:-gpu}.json" --profile "$OUT/profile.txt" > "$OUT/bench.log" 2>&1
echo "bench rc $? at $(elapsed) s"

timeout 130 python3 -m pytest -m cuda --no-cov -p no:cacheprovider -q -rA tests > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests rc $? at $(elapsed) s: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$OUT/cuda_tests.log" | tail -1)"

wait $writer
left=$((BUDGET - $(elapsed)))
timeout $left python3 -m benchmarks.overhead --epochs 2 --json "$OUT/overhead.json" --data.root /tmp/cifar --train.device cuda > "$OUT/overhead.log" 2>&1
echo "overhead rc $? at $(elapsed) s"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv >> "$OUT/env.txt" 2>&1
cat "$OUT/${gpu:-gpu}.json" "$OUT/overhead.json" 2>/dev/null
grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/cuda_tests.log" | tail -15
