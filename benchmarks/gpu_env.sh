# Sourced by the scripts that run on a lent GPU machine (benchmarks/gpu_suite.sh, docs/results/grid_on_gpu.sh),
# from the repository root: sets py ($PYTHON, else python3) and work (a temporary folder removed on exit), installs
# the wheels in .whl/ (packages the machine's Python lacks, e.g. tyro) into work/site, never into the machine's
# Python, and puts them and src/ on PYTHONPATH.
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .whl/*.whl || exit 1
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
