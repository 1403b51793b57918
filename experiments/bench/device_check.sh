#!/usr/bin/env bash
# The one script to run on a GPU machine (an H100/H200 with JAX, PyTorch and Triton installed and
# no network): the `gpu` tests, then the training-throughput benchmark, then the kernel benchmark,
# in under 10 minutes.
#
#   bash experiments/bench/device_check.sh                        # from anywhere in the checkout
#   DEVICE_CHECK_BENCHES=kernels BENCH_ARGS="--tuning-sweep" bash experiments/bench/device_check.sh
#   THROUGHPUT_ARGS="--remat full" bash experiments/bench/device_check.sh
#
# Steps, each time-boxed with `timeout`; a failing step does not stop the later ones, and the exit
# codes are printed at the end (the script exits 1 if the tests or a benchmark failed):
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
#   3. `python -m pytest -m gpu` on those of tests/test_ops_kernels.py, tests/test_ops_delta_kernels.py,
#      tests/test_ops_attention_fast.py and tests/test_models_precision.py that exist, with
#      JAX_PLATFORMS=cuda (tests/conftest.py would otherwise default JAX to the CPU);
#   4. the benchmarks named in DEVICE_CHECK_BENCHES, in that order (default "throughput kernels"):
#      `throughput` = `python -m experiments.bench.train_throughput` (~350M-parameter models per
#      family, XLA against the kernel path, tokens/s and MFU; THROUGHPUT_ARGS), `kernels` =
#      `python -m experiments.bench.kernels` (the chunk ops alone; BENCH_ARGS). Each gets a
#      --budget-s: every benchmark but the last DEVICE_CHECK_SHARE percent (60) of the time left
#      minus BENCH_MARGIN_S, and is killed BENCH_MARGIN_S after its budget (a started cell may
#      overrun it; the outputs written after every cell survive); the last one gets what remains,
#      minus the margin, under the limit (DEVICE_CHECK_LIMIT_S, default 560 s of the device tool's
#      600 s). Results (train_throughput.json/.md/.png, kernels.json/.md/.png) go into $OUT when it
#      is set (the device tool returns files under $OUT), else into docs/results. The steps' logs
#      are kept in /tmp/lolax_device_check and, with $OUT set, joined into $OUT/device_check.log
#      (the device tool returns at most 8 files: six results, that log and device_check.txt). It
#      prints the tables last.
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
# DEVICE_CHECK_BENCHES ("throughput kernels"; "" for none), DEVICE_CHECK_SHARE (60),
# BENCH_MARGIN_S (60: seconds kept between a benchmark's budget and its kill, and before the limit),
# THROUGHPUT_ARGS, BENCH_ARGS (the kernel benchmark's), DEVICE_CHECK_PLATFORM (cuda; cpu for a dry
# run of this script on a machine without a GPU, where both benchmarks run their smoke tests):
#
#   OUT=/tmp/dc_out DEVICE_CHECK_PLATFORM=cpu DEVICE_CHECK_LIMIT_S=300 PYTHON=.venv/bin/python \
#       bash experiments/bench/device_check.sh

set -u
set -o pipefail

cd "$(dirname "$0")/../.." || exit 2
START=$SECONDS
PY=${PYTHON:-python3}
LIMIT=${DEVICE_CHECK_LIMIT_S:-560}
TEST_TIMEOUT=${TEST_TIMEOUT_S:-180}
MARGIN=${BENCH_MARGIN_S:-60}
SHARE=${DEVICE_CHECK_SHARE:-60}
BENCHES=${DEVICE_CHECK_BENCHES-throughput kernels}
RESULTS=${OUT:-docs/results}
LOGS=/tmp/lolax_device_check
WHEELS=/tmp/lolax_wheels
SITE=/tmp/lolax_site
GPU_TESTS="tests/test_ops_kernels.py tests/test_ops_delta_kernels.py tests/test_ops_attention_fast.py
           tests/test_models_precision.py"
mkdir -p "$RESULTS" "$LOGS"
rm -f "$LOGS"/*.log

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
" 2>&1 | tee "$LOGS/1_setup.log"
RC_IMPORT=$?

note "3. gpu tests"
TEST_FILES=()
for f in $GPU_TESTS; do
    if [ -f "$f" ]; then TEST_FILES+=("$f"); else echo "not in this checkout (skipped): $f"; fi
done
RC_TESTS=0
if [ ${#TEST_FILES[@]} -gt 0 ]; then
    timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -m gpu "${TEST_FILES[@]}" -o addopts="" -q -p no:cacheprovider \
        2>&1 | tee "$LOGS/2_pytest.log"
    RC_TESTS=$?
fi

# run_bench NAME IS_LAST INDEX: one benchmark with its share of the time left.
SUMMARY_BENCH=""
RC_BENCHES=0
run_bench() {
    local name=$1 last=$2 log="$LOGS/3_bench_$3_$1.log" module md args
    case $name in
        throughput) module=experiments.bench.train_throughput; md=train_throughput.md; args=${THROUGHPUT_ARGS:-} ;;
        kernels) module=experiments.bench.kernels; md=kernels.md; args=${BENCH_ARGS:-} ;;
        *) echo "unknown benchmark '$name' in DEVICE_CHECK_BENCHES (throughput, kernels)"
           SUMMARY_BENCH="$SUMMARY_BENCH${SUMMARY_BENCH:+, }$name unknown"; RC_BENCHES=1; return ;;
    esac
    local remaining=$((LIMIT - (SECONDS - START))) budget kill_after
    if [ "$last" = 1 ]; then
        budget=$((remaining - MARGIN))
        kill_after=$((remaining - 10))
    else
        budget=$(((remaining - MARGIN) * SHARE / 100))
        kill_after=$((budget + MARGIN))
    fi
    [ $budget -lt 30 ] && budget=30
    [ $kill_after -lt 45 ] && kill_after=45
    note "4. benchmark $name (budget ${budget} s, killed after ${kill_after} s)"
    # shellcheck disable=SC2086 - args is a list of words
    timeout -k 10 "$kill_after" "$PY" -m "$module" --out "$RESULTS" --budget-s "$budget" $args \
        > "$log" 2>&1
    local rc=$?
    # the log without the tables (printed at the end)
    sed '/^# \(Kernel benchmark\|Training throughput\|Compile time against depth\)/,$d' "$log" | tail -n 40
    [ -f "$RESULTS/$md" ] || echo "no $RESULTS/$md written"
    SUMMARY_BENCH="$SUMMARY_BENCH${SUMMARY_BENCH:+, }$name $rc"
    [ $rc -eq 0 ] || RC_BENCHES=1
}

read -r -a BENCH_LIST <<< "$BENCHES"
for i in "${!BENCH_LIST[@]}"; do
    run_bench "${BENCH_LIST[$i]}" $((i == ${#BENCH_LIST[@]} - 1 ? 1 : 0)) $((i + 1))
done

note "results ($RESULTS)"
for name in "${BENCH_LIST[@]}"; do
    case $name in
        throughput) [ -f "$RESULTS/train_throughput.md" ] && cat "$RESULTS/train_throughput.md" ;;
        kernels) [ -f "$RESULTS/kernels.md" ] && cat "$RESULTS/kernels.md" ;;
    esac
done
[ -f "$LOGS/2_pytest.log" ] && tail -n 3 "$LOGS/2_pytest.log"
SUMMARY="exit codes: wheels $RC_WHEELS, install $RC_INSTALL, import $RC_IMPORT, tests $RC_TESTS, benchmarks ${SUMMARY_BENCH:-none}; $((SECONDS - START)) s"
echo "$SUMMARY" | tee "$LOGS/device_check.txt"
if [ -n "${OUT:-}" ]; then
    cp "$LOGS/device_check.txt" "$OUT/device_check.txt"
    for f in "$LOGS"/*.log; do [ -f "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; echo; }; done \
        > "$OUT/device_check.log"
fi
[ $RC_TESTS -eq 0 ] && [ $RC_BENCHES -eq 0 ] || exit 1
