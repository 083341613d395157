#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md waits for, in one run of at most 8 minutes wall on one H100/H200
# (compilation included), most important first. Each step runs under `timeout -k 10 LIMIT` (SIGTERM, then SIGKILL
# 10 s later if the step ignores it) with LIMIT = its own limit, cut to what is left of the suite's budget; a step
# with under 20 s left is skipped and says so.
#   0. gpu_check     correctness of the CUDA-only paths (flex doc mask, grouped_mm, MoE compile, knocks) (limit 95 s)
#   1. gpu_mfu       dense 136M: baseline, KHA-MLP v, KHA-Linear qkv; bf16, compiled; MFU; then a profile of 3
#                    steps per case: kernels, busy and idle time, where each knock's extra time goes (limit 160 s)
#   2. gpu_mfu_moe   moe-a0.4b (0.437B activated of 2.35B), bf16, compiled; MFU on activated FLOPs;
#                    profiled as gpu_mfu                                                              (limit 130 s)
#   3. moe_compile   `kha train --config tiny-moe --compile` vs eager, 100 steps each: recompiles, step time
#                    (needs data/shakespeare or KHA_SUITE_DATA)                                       (limit 120 s)
#   4. moe           MoE step vs dense, expert forms (grouped_mm / padded / loop), tiny shape, eager (limit 30 s)
#   5. precision     fp32 / bf16, eager / compiled, study shape                                         (what is left)
# Limits from one H200 with an empty compile cache (docs/benchmarks.md section d): gpu_check took 80 s, gpu_mfu
# with 6 rounds ~125 s (now 20 rounds, about 5 s more: 6 rounds left the knocks' ratios unresolved, their 95 %
# intervals 12 % wide), gpu_mfu_moe 117 s; moe_compile's compiled run needed more than 100 s cold. Steps 4-5 get
# what is left of the budget (precision, ~95 s, often only part of its shapes).
# vs_transformers.py (a 157k-vocabulary dense-0.6b compile that alone took more than 150 s) is not in the suite.
#
# Results: OUT_DIR/gpu_suite.tar.gz (each step's NAME.md table, NAME.json, NAME.log stderr) and OUT_DIR/suite.txt
# (machine, exit code and wall time of every step; exit 124/137: the step hit its limit): two files.
#
#   benchmarks/gpu_suite.sh OUT_DIR            on a CUDA machine (python: $PYTHON, else python3)
#   benchmarks/gpu_suite.sh OUT_DIR --dry-run  the same steps on CPU at toy sizes: checks the script, measures nothing
#
# Budget: KHA_SUITE_BUDGET_S (default 465 s for the steps; with start-up and packing under 8 minutes).
# Wheels: a machine whose Python lacks kha's dependencies (e.g. torch 2.11 without tyro) gets them
# from .whl/ in the working tree, installed into a temporary folder, never into the machine's Python. Fill it
# beforehand on a machine with a package index:
#   pip download --no-deps --only-binary=:all: -d .whl tyro docstring-parser typeguard typing-extensions
# and carry .whl/ (and data/shakespeare, from `kha data prepare --out data/shakespeare`) with the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--dry-run]}
dry=${2:-}
budget=${KHA_SUITE_BUDGET_S:-465}
data=${KHA_SUITE_DATA:-data/shakespeare}
mkdir -p "$out"
source benchmarks/gpu_env.sh

if [[ $dry == --dry-run ]]; then  # CPUs compile slower: limits and budget x KHA_SUITE_LIMIT_SCALE (default 4)
    gpu=(--device cpu --quick); mfu=(--cpu-logic-check --profile-steps 1); check=(--device cpu); steps=3; skip=1; train=(--device cpu --batch-size 2 --seq-len 32)
    rounds=()
    scale=${KHA_SUITE_LIMIT_SCALE:-4}
else
    gpu=(--device cuda); mfu=(--repeats 20 --warmup 2 --profile-steps 3); check=(--device cuda); steps=100; skip=10; train=(--device cuda --batch-size 32 --seq-len 256)
    rounds=(--repeats 5)
    scale=${KHA_SUITE_LIMIT_SCALE:-1}
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')" || exit 1
fi
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    | tee "$out/suite.txt"
budget=$((budget * scale))
results="$work/gpu_suite"
mkdir -p "$results"
start_all=$SECONDS

step() {  # step NAME LIMIT COMMAND...: table to NAME.md, stderr to NAME.log, a line in suite.txt
    local name=$1 limit=$(($2 * scale)) start=$SECONDS rc left
    shift 2
    left=$((budget - (SECONDS - start_all)))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "$name: skipped, ${left} s of the budget left" | tee -a "$out/suite.txt"
        return
    fi
    echo "== $name (limit $limit s): $*"
    timeout -k 10 "$limit" "$@" > "$results/$name.md" 2> "$results/$name.log"
    rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/suite.txt"
}

step gpu_check 95 "$py" benchmarks/gpu_check.py "${check[@]}" --json "$results/gpu_check.json"
step gpu_mfu 160 "$py" benchmarks/gpu_mfu.py "${mfu[@]}" --json "$results/gpu_mfu.json"
step gpu_mfu_moe 130 "$py" benchmarks/gpu_mfu.py --moe "${mfu[@]}" --json "$results/gpu_mfu_moe.json"
if [[ -f $data/manifest.json ]]; then
    step moe_compile 120 "$py" benchmarks/moe_compile.py --data "$data" --steps "$steps" --skip "$skip" --precision bf16 \
        "${train[@]}" --json "$results/moe_compile.json"
else
    echo "moe_compile: skipped, no $data (kha data prepare --out data/shakespeare)" | tee -a "$out/suite.txt"
fi
step moe 30 "$py" benchmarks/moe.py "${gpu[@]}" --shapes tiny "${rounds[@]}" --json "$results/moe.json"
step precision 600 "$py" benchmarks/precision.py "${gpu[@]}" --shapes study --json "$results/precision.json"
echo "suite: $((SECONDS - start_all)) s of a $budget s budget" | tee -a "$out/suite.txt"
tar -czf "$out/gpu_suite.tar.gz" -C "$work" gpu_suite
