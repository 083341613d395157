#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md waits for, in one run, most important first, each under its own time
# limit so that one slow or failing step cannot eat the others' time:
#   1. gpu_mfu.py: tokens/s and MFU of the 136M dense model (target >= 40 % MFU), ~3 min
#   2. an MoE training run: `kha train` of the tiny-moe preset, bf16, 300 steps (needs data/shakespeare), ~1 min
#   3. precision.py --shapes study,small: fp32 / bf16, eager / compiled per shape, ~3 min
#   4. moe.py: MoE against dense, grouped_mm / padded / loop, ~1 min
#   5. vs_transformers.py --dtype bf16 --compile (needs transformers), ~4 min
# Each writes NAME.md (its printed table), NAME.json and NAME.log (stderr) into OUT_DIR; a summary of exit codes
# and wall times goes to OUT_DIR/suite.txt (16 files in all: pack the folder to copy it elsewhere). Each step stops
# after KHA_SUITE_LIMIT_S seconds (default 150, so the whole suite takes at most 12.5 min plus start-up).
#
#   benchmarks/gpu_suite.sh OUT_DIR            on a CUDA machine (python: $PYTHON, else python3)
#   benchmarks/gpu_suite.sh OUT_DIR --dry-run  the same steps on CPU at toy sizes: checks the script, measures nothing
#
# On a machine whose Python lacks kha's dependencies (e.g. tyro), put their wheels in .whl/ first (here:
# `pip download --no-deps --only-binary=:all: -d .whl tyro docstring-parser typeguard`); they are installed
# into a temporary folder, not into the machine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--dry-run]}
dry=${2:-}
py=${PYTHON:-python3}
limit=${KHA_SUITE_LIMIT_S:-150}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kha-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/kha-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ $dry == --dry-run ]]; then
    gpu=(--device cpu --quick); mfu=(--cpu-logic-check); steps=3; train_device=cpu; compile=()
else
    gpu=(--device cuda); mfu=(--batch 16 --seq-len 2048); steps=300; train_device=cuda; compile=(--compile)
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')" || exit 1
fi
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    | tee "$out/suite.txt"

step() {  # step NAME COMMAND...: run under the limit, table to NAME.md, stderr to NAME.log, a line in suite.txt
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log"
    rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/suite.txt"
}

step gpu_mfu "$py" benchmarks/gpu_mfu.py "${mfu[@]}" --json "$out/gpu_mfu.json"
if [[ -f data/shakespeare/manifest.json ]]; then
    rm -rf "$out/moe_run"
    step moe_train "$py" -m kha.cli train --preset tiny-moe --data data/shakespeare --device "$train_device" \
        --precision bf16 "${compile[@]}" --steps "$steps" --batch-size 32 --seq-len 256 --eval-every 100 \
        --eval-batches 10 --ckpt-every "$steps" --no-progress --out "$out/moe_run"
    cp "$out/moe_run/metrics.jsonl" "$out/moe_train_metrics.jsonl" 2> /dev/null
    rm -rf "$out/moe_run"  # checkpoints and weights stay behind
else
    echo "moe_train: skipped, no data/shakespeare (kha data prepare --out data/shakespeare)" | tee -a "$out/suite.txt"
fi
step precision "$py" benchmarks/precision.py "${gpu[@]}" --shapes study,small --json "$out/precision.json"
step moe "$py" benchmarks/moe.py "${gpu[@]}" --json "$out/moe.json"
step vs_transformers "$py" benchmarks/vs_transformers.py "${gpu[@]}" --dtype bf16 "${compile[@]}" \
    --json "$out/vs_transformers.json"
