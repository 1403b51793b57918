#!/usr/bin/env bash
# The one script to run on a GPU machine (an H100/H200 with JAX, PyTorch and Triton installed and
# no network): the `gpu` tests of the kernels, then the kernel benchmark, in under 10 minutes.
#
#   bash experiments/bench/device_check.sh                        # from anywhere in the checkout
#   BENCH_ARGS="--tuning-sweep" bash experiments/bench/device_check.sh
#
# Steps, each time-boxed with `timeout`; a failing step does not stop the later ones, and the exit
# codes are printed at the end (the script exits 1 if the tests or the benchmark failed):
#   1. installs the wheels carried in .whl/ (if any) into /tmp/lolax_wheels: fla-core (pure
#      Python; it needs einops, torch and triton, which the machine has) and ml-collections (the one
#      runtime dependency of pyproject.toml the machine's image lacks; only lolax.parallelism uses it);
#   2. installs this checkout (the lolax.* package-dir mapping of pyproject.toml) with
#      `pip install --no-deps --no-build-isolation --target /tmp/lolax_site .`; if that fails (e.g. a
#      setuptools older than 77 there), it lays out /tmp/lolax_site/lolax as symbolic links to the
#      checkout's lolax/__init__.py, ops/, models/, optim/ and parallelism/ instead. Either way it
#      runs Python with PYTHONSAFEPATH=1, so the checkout's own lolax/ folder (which holds only
#      __init__.py) does not shadow the installed package, and the checkout is on PYTHONPATH after
#      it for `experiments` and `tests`;
#   3. `python -m pytest -m gpu tests/test_ops_kernels.py tests/test_ops_delta_kernels.py` with JAX_PLATFORMS=cuda
#      (tests/conftest.py would otherwise default JAX to the CPU);
#   4. `python -m experiments.bench.kernels` with a --budget-s that leaves a margin under the limit
#      (DEVICE_CHECK_LIMIT_S, default 560 s of the device tool's 600 s), writing kernels.json, .md
#      and .png into $OUT when it is set (the device tool returns files under $OUT), else into
#      docs/results; logs go to $OUT, else to /tmp/lolax_device_check. It prints the table last.
#
# Preparing .whl/ (on a developer's machine with pip access, in the repository root; the folder
# must stay out of git):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl fla-core==0.6.0 ml-collections==1.1.0
#   unzip -p .whl/fla_core-0.6.0-py3-none-any.whl '*/WHEEL' | grep -E 'Root-Is-Purelib|Tag'      # true, py3-none-any
#   unzip -p .whl/fla_core-0.6.0-py3-none-any.whl '*/METADATA' | grep ^Requires-Dist              # einops; torch, triton (extras)
#
# and, through the device tool: run(command="bash experiments/bench/device_check.sh", carry=[".whl"],
# timeout_s=600). On a machine with network access, `pip install fla-core` replaces the .whl/ folder.
#
# Environment: PYTHON (default python3), DEVICE_CHECK_LIMIT_S (560), TEST_TIMEOUT_S (180),
# BENCH_MARGIN_S (60: seconds kept between the benchmark's budget and the limit), BENCH_ARGS,
# DEVICE_CHECK_PLATFORM (cuda; cpu for a dry run of this script on a machine without a GPU).

set -u
set -o pipefail

cd "$(dirname "$0")/../.." || exit 2
START=$SECONDS
PY=${PYTHON:-python3}
LIMIT=${DEVICE_CHECK_LIMIT_S:-560}
TEST_TIMEOUT=${TEST_TIMEOUT_S:-180}
MARGIN=${BENCH_MARGIN_S:-60}
RESULTS=${OUT:-docs/results}
LOGS=${OUT:-/tmp/lolax_device_check}
WHEELS=/tmp/lolax_wheels
SITE=/tmp/lolax_site
mkdir -p "$RESULTS" "$LOGS"

export JAX_PLATFORMS=${DEVICE_CHECK_PLATFORM:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
export PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
export PYTHONPATH="$SITE:$WHEELS:$PWD${PYTHONPATH:+:$PYTHONPATH}"

note() { echo "== [$((SECONDS - START)) s] $*"; }

note "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | head -5
"$PY" --version

note "1. carried wheels"
RC_WHEELS=0
if compgen -G ".whl/*.whl" > /dev/null; then
    ls .whl/
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WHEELS" .whl/*.whl
    RC_WHEELS=$?
else
    echo "no .whl/ folder: flash-linear-attention is used only if the machine already has it"
fi

note "2. lolax from this checkout"
rm -rf "$SITE"
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$SITE" .
RC_INSTALL=$?
if [ $RC_INSTALL -ne 0 ] || ! timeout 120 "$PY" -c "import lolax.ops" 2>/dev/null; then
    echo "pip install of the checkout failed (rc $RC_INSTALL): linking the package folders instead"
    rm -rf "$SITE" && mkdir -p "$SITE/lolax"
    ln -s "$PWD/lolax/__init__.py" "$SITE/lolax/__init__.py"
    for p in ops models optim parallelism; do ln -s "$PWD/$p" "$SITE/lolax/$p"; done
fi
timeout 180 "$PY" -c "
import jax, lolax.ops
print('lolax.ops from', lolax.ops.__file__)
print('jax', jax.__version__, jax.devices())
try:
    import fla.ops.gla, fla.ops.gated_delta_rule
    print('fla', fla.__version__, 'from', fla.__file__)
except Exception as e:
    print('fla not importable:', type(e).__name__, e)
" 2>&1 | tee "$LOGS/setup.log"
RC_IMPORT=$?

note "3. gpu tests"
timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -m gpu tests/test_ops_kernels.py tests/test_ops_delta_kernels.py -o addopts="" -q -p no:cacheprovider \
    2>&1 | tee "$LOGS/pytest.log"
RC_TESTS=$?

ELAPSED=$((SECONDS - START))
REMAINING=$((LIMIT - ELAPSED))
BUDGET=$((REMAINING - MARGIN))
[ $BUDGET -lt 30 ] && BUDGET=30
KILL_AFTER=$((REMAINING - 10))
[ $KILL_AFTER -lt 45 ] && KILL_AFTER=45
note "4. benchmark (budget ${BUDGET} s, killed after ${KILL_AFTER} s)"
# shellcheck disable=SC2086 - BENCH_ARGS is a list of words
timeout -k 10 "$KILL_AFTER" "$PY" -m experiments.bench.kernels --out "$RESULTS" --budget-s "$BUDGET" ${BENCH_ARGS:-} \
    > "$LOGS/bench.log" 2>&1
RC_BENCH=$?
sed '/^# Kernel benchmark/,$d' "$LOGS/bench.log" | tail -n 40

note "results ($RESULTS)"
[ -f "$RESULTS/kernels.md" ] && cat "$RESULTS/kernels.md"
tail -n 3 "$LOGS/pytest.log"
SUMMARY="exit codes: wheels $RC_WHEELS, install $RC_INSTALL, import $RC_IMPORT, tests $RC_TESTS, benchmark $RC_BENCH; $((SECONDS - START)) s"
echo "$SUMMARY" | tee "$LOGS/device_check.txt"
[ $RC_TESTS -eq 0 ] && [ $RC_BENCH -eq 0 ] || exit 1
