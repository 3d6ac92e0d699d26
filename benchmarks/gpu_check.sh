#!/usr/bin/env bash
# The GPU check: build the extension, run the CUDA and Triton tests, `resnet-fast bench --device cuda`
# (ResNet-50, bf16, channels_last, batch 256: eager and every backend, then eager and torch.compile) and
# the block benchmarks, and write a report.
#
# Made for a lent GPU machine (torch installed, no network, 16 cores) and its first 8 minutes: every
# step runs under `timeout` with its own budget, all of them under one deadline (470 s), a failed step
# does not stop the others, and results are written as they come (pytest's JUnit XML, one JSON line
# per benchmark), so a step cut off by its budget keeps what it measured.
#
# Usage:
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --out DIR       # the report and raw files into DIR (e.g. $OUT of a device run)
#   bash benchmarks/gpu_check.sh --dry-run       # anywhere (CPU): check this script and run tiny CPU versions
#                                                # of each step, into a temporary folder unless --out is given
#
# What it writes (8 files, at most 2 folders deep, each log cut to 2 MiB):
#   DIR/<date>-<gpu>.md, DIR/<date>-<gpu>.json      the report (DIR defaults to benchmarks/results)
#   DIR/raw/steps.tsv, logs.txt, tests.xml, benchmarks.jsonl, bench-cli.json, bench-compile.json
# and prints the report (cut to 9,000 characters) and the tail of any step that failed.
#
# Budgets (seconds), estimated from CPU runs of the same steps (benchmarks/NOTES.md, "GPU check budgets"):
#   build 120 (16 jobs), tests 150 (Triton autotuning off except in the autotune tests), bench-cli 100,
#   bench-compile 90, bench-blocks 60 (whatever is left: one JSON line each), summary 10; deadline 470 < 480.
#   The two bench steps are separate so that torch.compile running long cannot cost the backends' numbers.
# Environment: PYTHON (default python3), BUDGET_SCALE (multiply every budget and the deadline, e.g. 2),
# MAX_JOBS (build parallelism, default: every core).

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY_RUN=0
OUT_DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --out DIR, --help)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SCALE="${BUDGET_SCALE:-1}"
budget() { echo $(( $1 * SCALE )); }
START=$(date +%s)
DEADLINE=$(( START + $(budget 470) ))
SUMMARY_RESERVE=$(budget 10)

# Syntax check of this very script first: a typo must not cost a GPU session.
bash -n "${BASH_SOURCE[0]}" || { echo "gpu_check.sh: syntax error" >&2; exit 2; }

DATE="$(date +%Y-%m-%d)"
if [[ $DRY_RUN -eq 1 ]]; then
    GPU_NAME="dry run on CPU"
    GPU_SLUG="dry-run-cpu"
    OUT_DIR="${OUT_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}"
else
    GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    if [[ -z "$GPU_NAME" ]]; then
        GPU_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)"
    fi
    if [[ -z "$GPU_NAME" ]]; then
        echo "gpu_check.sh: no GPU visible (nvidia-smi and torch.cuda see none); use --dry-run on a CPU machine" >&2
        exit 2
    fi
    GPU_SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
    OUT_DIR="${OUT_DIR:-$ROOT/benchmarks/results}"
fi
RAW="$OUT_DIR/raw"
mkdir -p "$RAW"
STEM="$OUT_DIR/$DATE-$GPU_SLUG"
STEPS_TSV="$RAW/steps.tsv"
LOGS="$RAW/logs.txt"
TESTS_XML="$RAW/tests.xml"
BENCH_JSONL="$RAW/benchmarks.jsonl"
CLI_JSON="$RAW/bench-cli.json"
COMPILE_JSON="$RAW/bench-compile.json"
: > "$STEPS_TSV"
: > "$LOGS"
rm -f "$TESTS_XML" "$BENCH_JSONL" "$CLI_JSON" "$COMPILE_JSON"
STEP_LOG="$(mktemp -t gpu_check_step.XXXXXX)"
trap 'rm -f "$STEP_LOG"' EXIT

FAILED=0
FAILED_STEPS=()
# run_step NAME BUDGET_SECONDS COMMAND...: run under timeout (never past the deadline), append its output to
# logs.txt, record verdict, exit status, duration and budget in steps.tsv.
run_step() {
    local name="$1" seconds="$2"
    shift 2
    local left=$(( DEADLINE - SUMMARY_RESERVE - $(date +%s) ))
    (( seconds > left )) && seconds=$left
    if (( seconds < 5 )); then
        echo "== $name: skipped, no time left before the deadline"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "no-time" 0 0 "$*" 0 >> "$STEPS_TSV"
        FAILED=1; FAILED_STEPS+=("$name")
        return
    fi
    echo "== $name (budget ${seconds}s): $*"
    local start end status took verdict
    start=$(date +%s.%N)
    timeout --kill-after=10 "$seconds" "$@" > "$STEP_LOG" 2>&1
    status=$?
    end=$(date +%s.%N)
    took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    verdict="ok"
    if [[ $status -eq 124 || $status -eq 137 ]]; then verdict="timeout"; elif [[ $status -ne 0 ]]; then verdict="failed"; fi
    [[ "$verdict" == "ok" ]] || { FAILED=1; FAILED_STEPS+=("$name"); }
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$verdict" "$status" "$took" "$*" "$seconds" >> "$STEPS_TSV"
    {
        echo "=================== $name: $verdict (exit $status) in ${took}s: $*"
        if (( $(wc -c < "$STEP_LOG") > 2097152 )); then
            head -c 1048576 "$STEP_LOG"; echo; echo "... (cut: the middle of a log over 2 MiB) ..."; tail -c 1048576 "$STEP_LOG"
        else
            cat "$STEP_LOG"
        fi
    } >> "$LOGS"
    echo "   -> $verdict (exit $status) in ${took}s"
    [[ "$verdict" == "ok" ]] || tail -n 15 "$STEP_LOG" | cut -c1-300 | sed 's/^/      /'
}

echo "gpu_check: $GPU_NAME, python $PYTHON, results in $OUT_DIR"
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")'

TEST_ARGS=(-p no:cacheprovider -q -rfE --durations=15 --junitxml "$TESTS_XML")
if [[ $DRY_RUN -eq 1 ]]; then
    # 1. build: never reinstall on a development machine; check the package imports and report the extension.
    echo "(dry run) would run: MAX_JOBS=\$(nproc) pip install --no-build-isolation --no-deps -e ."
    run_step build "$(budget 60)" "$PYTHON" -c \
        'import resnet_fast, resnet_fast._extension as e; print("extension:", e.build_info())'
    # 2. tests: collect the cuda/triton-marked tests (they run on the GPU machine), plus one real test for the XML.
    echo "(dry run) would run: pytest -m 'cuda or triton' tests --junitxml $TESTS_XML"
    run_step tests "$(budget 120)" "$PYTHON" -m pytest "${TEST_ARGS[@]}" \
        tests/test_gpu_readiness.py -k "kernel_image_reason"
    # 3. the bench command, tiny.
    echo "(dry run) would run: resnet-fast bench --device cuda --model resnet50 --batch-size 256 --dtype bfloat16 ..."
    run_step bench-cli "$(budget 120)" "$PYTHON" -m resnet_fast.bench --device cpu --model resnet18 --batch-size 2 \
        --image-size 32 --iterations 1 --warmup 0 --peers none --backend all --json "$CLI_JSON"
    echo "(dry run) would run: resnet-fast bench --device cuda ... --backend auto --peers compile"
    run_step bench-compile "$(budget 120)" "$PYTHON" -m resnet_fast.bench --device cpu --model resnet18 \
        --batch-size 2 --image-size 32 --iterations 1 --warmup 0 --peers jit --backend auto --json "$COMPILE_JSON"
    # 4. the block benchmarks: one shape, CPU, batch 1.
    echo "(dry run) would run: pytest benchmarks/test_bench_blocks.py --benchmark-only (one JSON line each)"
    run_step bench-blocks "$(budget 120)" env RESNET_FAST_BENCH_DEVICE=cpu RESNET_FAST_BENCH_BLOCK_BATCH=1 \
        RESNET_FAST_BENCH_JSONL="$BENCH_JSONL" "$PYTHON" -m pytest benchmarks/test_bench_blocks.py \
        -p no:cacheprovider -q --benchmark-only -k "test_block_eval and layer4.1.conv2 and (stock or reference)"
else
    # 1. build the extension (CPU + CUDA kernels for the visible GPU's architecture), no network needed;
    #    RESNET_FAST_EXPECT_CUDA_KERNELS makes a build without the CUDA kernels fail here, not later.
    run_step build "$(budget 120)" env MAX_JOBS="${MAX_JOBS:-$(nproc)}" RESNET_FAST_EXPECT_CUDA_KERNELS=1 \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
    # 2. the CUDA-marked and Triton tests on the GPU (TRITON_INTERPRET unset). Autotuning is off (a fixed tile
    #    per layer) except in the tests of the autotuned conv, which turn it back on.
    run_step tests "$(budget 150)" env -u TRITON_INTERPRET RESNET_FAST_TRITON_AUTOTUNE=off \
        "$PYTHON" -m pytest -m "cuda or triton" tests "${TEST_ARGS[@]}"
    # 3. the main job: ResNet-50 eval, batch 256, bf16, channels_last; eager and every backend (the Triton
    #    backend autotunes and selects per layer on its first pass: that is its first-output time).
    run_step bench-cli "$(budget 100)" env -u TRITON_INTERPRET "$PYTHON" -m resnet_fast.bench --device cuda \
        --model resnet50 --batch-size 256 --dtype bfloat16 --memory-format channels_last --backend all \
        --peers none --iterations 20 --warmup 5 --json "$CLI_JSON"
    # 4. the same workload against torch.compile (default mode; max-autotune tunes every convolution and
    #    takes minutes more than a first run has: `--compile-mode max-autotune` on a later one).
    run_step bench-compile "$(budget 90)" env -u TRITON_INTERPRET "$PYTHON" -m resnet_fast.bench --device cuda \
        --model resnet50 --batch-size 256 --dtype bfloat16 --memory-format channels_last --backend auto \
        --peers compile --compile-mode default --iterations 20 --warmup 5 --json "$COMPILE_JSON"
    # 5. the block benchmarks at the ResNet-50 stage shapes (bf16, channels_last, batch 128), as many as fit.
    run_step bench-blocks "$(budget 60)" env -u TRITON_INTERPRET RESNET_FAST_BENCH_JSONL="$BENCH_JSONL" \
        "$PYTHON" -m pytest benchmarks/test_bench_blocks.py -p no:cacheprovider -q --benchmark-only
fi

# 6. the report: <stem>.json and <stem>.md from the raw files, printed for the machine's reply.
echo "== summary"
if ! timeout "$(budget 30)" "$PYTHON" benchmarks/gpu_check_report.py --raw "$RAW" --stem "$STEM" --print; then
    echo "gpu_check: the report could not be written (raw files in $RAW)"
    FAILED=1; FAILED_STEPS+=("summary")
fi
echo "gpu_check: $(( $(date +%s) - START )) s; report $STEM.md; raw files in $RAW"
[[ ${#FAILED_STEPS[@]} -eq 0 ]] || echo "gpu_check: steps not ok: ${FAILED_STEPS[*]}"
exit $FAILED
