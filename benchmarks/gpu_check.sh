#!/usr/bin/env bash
# The checks that need a CUDA device, in one go, on a machine that has the repository and nothing else.
#
#   1. a virtual environment with the project and its test extra: `pip install -e '.[test]'`, offline from the
#      wheels in .whl/ where that folder exists (it must then hold hatchling too, the build backend), else
#      from the package index; it sees the machine's own packages (--system-site-packages), so a CUDA build
#      of torch installed there is used as it is;
#   2. the CUDA tests: python -m pytest tests/gpu -m gpu -v (their printed deviations and memory too);
#   3. the full-size benchmark on the device: python benchmarks/scale.py --size full --device cuda.
#
# Everything it prints goes to ${OUT:-benchmarks/out}: env.txt (device, versions), one log per step and
# summary.txt (each step's exit status and seconds). All steps together stop after 8 minutes
# (GPU_CHECK_SECONDS to change it): a step still running then is stopped by `timeout` (exit 124) and its
# log so far is kept. Exit status: 0 when every step passed, else that of the first that failed.
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; OUT=/some/folder to choose the output
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
LIMIT="${GPU_CHECK_SECONDS:-480}"
DEADLINE=$(( $(date +%s) + LIMIT ))
VENV="${GPU_CHECK_VENV:-.venv-gpu}"
STATUS=0
: > "$OUT/summary.txt"

# step NAME COMMAND...: run COMMAND with the time left, its output in $OUT/NAME.log and on the screen
step() {
    local name=$1
    shift
    local left=$(( DEADLINE - $(date +%s) ))
    local start rc
    if (( left <= 0 )); then
        echo "$name: not started, the ${LIMIT} s are spent" | tee -a "$OUT/summary.txt"
        [ "$STATUS" -eq 0 ] && STATUS=124
        return 124
    fi
    echo "== $name ($left s left): $*"
    start=$(date +%s)
    timeout --kill-after=15 "$left" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    if [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ]; then
        STATUS=$rc
    fi
    return "$rc"
}

# the install, as one command for `timeout`
INSTALL='python3 -m venv --system-site-packages "$VENV" && "$VENV/bin/python" -m pip --version && if [ -d .whl ]; then
    "$VENV/bin/python" -m pip install --no-index --find-links .whl -e ".[test]"
else
    "$VENV/bin/python" -m pip install -e ".[test]"
fi'
export VENV

step install bash -c "$INSTALL"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no virtual environment at $VENV: nothing else can run" | tee -a "$OUT/summary.txt"
    cat "$OUT/summary.txt"
    exit "$STATUS"
fi
if ! "$VENV/bin/python" -c "import polypure" 2>/dev/null; then
    # the install failed (offline without .whl/, say): the machine's own packages and the source tree
    echo "polypure is not installed in $VENV: running from src/ with the machine's packages" \
        | tee -a "$OUT/summary.txt"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    nvidia-smi || echo "nvidia-smi: not found"
    "$VENV/bin/python" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('device', torch.cuda.get_device_name()
if torch.cuda.is_available() else None)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step tests "$VENV/bin/python" -m pytest tests/gpu -m gpu -v -rP -p no:cacheprovider
step scale "$VENV/bin/python" benchmarks/scale.py --size full --device cuda
echo "output in $OUT"
cat "$OUT/summary.txt"
exit "$STATUS"
