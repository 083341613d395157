#!/usr/bin/env bash
# A `kha ablate` grid on one GPU machine within a time limit, WORKERS processes at once (`--shard I/N`: each run
# belongs to one worker), for a machine lent for minutes: small models leave one GPU mostly idle (study preset on
# one H200: ~13 ms per compiled step, docs/benchmarks.md section d), so several runs share it. Every 30 s, and at
# the end, the grid's small files (metrics, configs, knocks, report; no weights, no checkpoints) are packed into
# RESULT_DIR/grid.tar.gz, so a run stopped at its limit still brings back every run finished before. Unpack it
# into a folder of its own and merge its finished runs (never over a run folder that is here, e.g. one still
# training on this machine): `mkdir -p /tmp/g && tar -xzf grid.tar.gz -C /tmp/g && kha ablate GRID --out GRID_DIR
# --merge-from /tmp/g/"$(basename GRID_DIR)"`; then commit them: the next call's working tree carries them, and the
# grid skips what is finished (interrupted runs start again: checkpoints do not travel).
#
#   docs/results/grid_on_gpu.sh RESULT_DIR WORKERS LIMIT_S GRID_DIR GRID [kha ablate options...]
#   e.g. docs/results/grid_on_gpu.sh "$OUT" 8 540 docs/results/study2 study2 --seeds 18 --data data/study2 ...
#
# GRID_DIR relative to the repository root keeps the paths the runs record free of the machine's.
# KHA_GRID_DATA_ARCHIVE: a .tar.xz of the data folder to unpack first (the study2 corpus is 56 MB as .bin files,
# 17 MB as `tar -cJf data/study2.tar.xz data/study2`). Wheels a machine lacks (tyro ...) come from .whl/ as in
# benchmarks/gpu_suite.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
result=${1:?usage: grid_on_gpu.sh RESULT_DIR WORKERS LIMIT_S GRID_DIR GRID [kha ablate options...]}
workers=${2:?WORKERS}; limit=${3:?LIMIT_S}; grid_dir=${4:?GRID_DIR}; grid=${5:?GRID}
shift 5
mkdir -p "$result" "$(dirname "$grid_dir")"
source benchmarks/gpu_env.sh
[[ -n ${KHA_GRID_DATA_ARCHIVE:-} ]] && { tar -xJf "$KHA_GRID_DATA_ARCHIVE" || exit 1; }

pack() {  # the grid's small files into RESULT_DIR/grid.tar.gz, replaced whole
    # hidden names: .lock and the temporary files of writes in flight (full weights among them); GNU tar exits 1
    # when a file changed while it was read (a run's metrics.jsonl, appended each step): the archive is still good,
    # and a torn last line is skipped by the reader
    tar -czf "$work/grid.tar.gz" -C "$(dirname "$grid_dir")" --exclude checkpoints --exclude model.safetensors \
        --exclude '.*' --warning=no-file-changed "$(basename "$grid_dir")" 2>/dev/null
    (( $? <= 1 )) && mv "$work/grid.tar.gz" "$result/grid.tar.gz"
}

start=$SECONDS
pids=()
for ((i = 0; i < workers; i++)); do
    timeout -k 10 "$limit" "$py" -m kha.cli ablate "$grid" --out "$grid_dir" "$@" --shard "$i/$workers" \
        > "$work/worker_$i.log" 2>&1 &
    pids+=($!)
done
while (( $(jobs -rp | wc -l) > 0 )); do
    sleep 30
    pack
    echo "$((SECONDS - start)) s: $(grep -h 'done in' "$work"/worker_*.log | wc -l) runs finished"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
"$py" -m kha.cli ablate "$grid" --out "$grid_dir" --report > /dev/null 2>&1 || true
pack
tail -n 3 "$work"/worker_*.log > "$result/workers.txt"
echo "grid_on_gpu: $((SECONDS - start)) s, last worker exit status $status (124/137: the time limit)" \
    | tee -a "$result/workers.txt"
