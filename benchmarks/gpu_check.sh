#!/usr/bin/env bash
# The GPU check: build the extension, run the CUDA and Triton tests, the GPU benchmarks and
# `resnet-fast bench --device cuda`, and write benchmarks/results/<date>-<gpu>.{json,md}.
#
# Made for a lent GPU machine with torch already installed and no network, in under 8 minutes:
# every step runs under `timeout` with its own budget, a failed step does not stop the others,
# and the summary records what each step did and how long it took.
#
# Usage:
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere in the repository
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere (CPU): check this script, print the steps and run
#                                             # tiny CPU versions of each, writing into a temporary folder
#   bash benchmarks/gpu_check.sh --out DIR    # write results (and logs) into DIR instead
#
# Step budgets (seconds; total 475 < 480): build 180, tests 60, block benchmarks 60, model benchmarks 120,
# bench CLI 45, summary 10. The two benchmark suites are separate steps so that one running out of time
# (pytest-benchmark writes its JSON only at the end) does not lose the other's numbers.
# Environment: PYTHON (default python3 or python), BUDGET_SCALE (multiply every step budget, e.g. 2).

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY_RUN=0
OUT_DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SCALE="${BUDGET_SCALE:-1}"
budget() { echo $(( $1 * SCALE )); }

# Syntax check of this very script first: a typo must not cost a GPU session.
bash -n "${BASH_SOURCE[0]}" || { echo "gpu_check.sh: syntax error" >&2; exit 2; }

DATE="$(date +%Y-%m-%d)"
if [[ $DRY_RUN -eq 1 ]]; then
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
mkdir -p "$OUT_DIR/logs"
STEM="$OUT_DIR/$DATE-$GPU_SLUG"
STEPS_TSV="$OUT_DIR/logs/$DATE-$GPU_SLUG-steps.tsv"
BLOCKS_JSON="$OUT_DIR/logs/$DATE-$GPU_SLUG-bench-blocks.json"
MODELS_JSON="$OUT_DIR/logs/$DATE-$GPU_SLUG-bench-models.json"
CLI_JSON="$OUT_DIR/logs/$DATE-$GPU_SLUG-bench-cli.json"
: > "$STEPS_TSV"
rm -f "$BLOCKS_JSON" "$MODELS_JSON" "$CLI_JSON"

FAILED=0
# run_step NAME BUDGET_SECONDS COMMAND...: run under timeout, log to logs/NAME.log, record status and duration.
run_step() {
    local name="$1" seconds="$2"
    shift 2
    local log="$OUT_DIR/logs/$DATE-$GPU_SLUG-$name.log"
    echo "== $name (budget ${seconds}s): $*"
    local start end status
    start=$(date +%s.%N)
    timeout --kill-after=10 "$seconds" "$@" > "$log" 2>&1
    status=$?
    end=$(date +%s.%N)
    local took
    took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    local verdict="ok"
    if [[ $status -eq 124 || $status -eq 137 ]]; then verdict="timeout"; elif [[ $status -ne 0 ]]; then verdict="failed"; fi
    # pytest exit 5 = nothing collected/selected (e.g. no cuda-marked tests yet): not a failure of the machine
    if [[ $status -eq 5 && "$name" == tests ]]; then verdict="no-tests"; fi
    [[ "$verdict" == "ok" || "$verdict" == "no-tests" ]] || FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$verdict" "$status" "$took" "$*" >> "$STEPS_TSV"
    echo "   -> $verdict (exit $status) in ${took}s; log: $log"
    tail -n 5 "$log" | sed 's/^/      /'
}

echo "gpu_check: $( [[ $DRY_RUN -eq 1 ]] && echo 'DRY RUN (tiny CPU versions)' || echo "$GPU_NAME" ), python $PYTHON, results in $OUT_DIR"
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")'

if [[ $DRY_RUN -eq 1 ]]; then
    # 1. build: do not reinstall on a development machine; check the package imports and report the extension.
    echo "(dry run) would run: pip install --no-build-isolation --no-deps -e ."
    run_step build "$(budget 60)" "$PYTHON" -c \
        'import resnet_fast, resnet_fast._extension as e; print("extension:", e.build_info())'
    # 2. tests: collect the cuda/triton-marked tests (they run on the GPU machine).
    echo "(dry run) would run: pytest -m 'cuda or triton' tests"
    run_step tests "$(budget 120)" "$PYTHON" -m pytest -m "cuda or triton" tests --collect-only -q -p no:cacheprovider
    # 3. benchmarks: one block shape and the small training workload, CPU, batch 1 blocks, no peers, few rounds.
    echo "(dry run) would run: pytest benchmarks/test_bench_blocks.py --benchmark-only --benchmark-json $BLOCKS_JSON"
    run_step bench-blocks "$(budget 120)" env RESNET_FAST_BENCH_DEVICE=cpu RESNET_FAST_BENCH_BLOCK_BATCH=1 \
        "$PYTHON" -m pytest benchmarks/test_bench_blocks.py -p no:cacheprovider -q --benchmark-only \
        --benchmark-json "$BLOCKS_JSON" -k "test_block_eval and layer4.1.conv2 and (stock or reference)"
    echo "(dry run) would run: pytest benchmarks/test_bench_models.py --benchmark-only --benchmark-json $MODELS_JSON"
    run_step bench-models "$(budget 180)" env RESNET_FAST_BENCH_DEVICE=cpu RESNET_FAST_BENCH_NO_PEERS=1 \
        "$PYTHON" -m pytest benchmarks/test_bench_models.py -p no:cacheprovider -q --benchmark-only \
        --benchmark-json "$MODELS_JSON" -k "test_model_train_step and stock-nchw"
    # 4. the bench command, tiny.
    echo "(dry run) would run: resnet-fast bench --device cuda --backend all --peers none --json $CLI_JSON"
    run_step bench-cli "$(budget 120)" "$PYTHON" -m resnet_fast.bench --device cpu --model resnet18 --batch-size 2 \
        --image-size 32 --iterations 1 --warmup 0 --peers none --backend all --json "$CLI_JSON"
else
    # 1. build the extension (CPU + CUDA kernels for the visible GPU's architecture), no network needed.
    run_step build "$(budget 180)" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
    # 2. the CUDA-marked tests and the Triton tests, on the GPU (TRITON_INTERPRET must be unset).
    run_step tests "$(budget 60)" env -u TRITON_INTERPRET "$PYTHON" -m pytest -m "cuda or triton" tests -q \
        -p no:cacheprovider
    # 3. the benchmark suites on GPU shapes (bf16, channels_last; blocks at batch 128, models at 1/64/256).
    run_step bench-blocks "$(budget 60)" env -u TRITON_INTERPRET "$PYTHON" -m pytest benchmarks/test_bench_blocks.py \
        --benchmark-only -q -p no:cacheprovider --benchmark-json "$BLOCKS_JSON"
    run_step bench-models "$(budget 120)" env -u TRITON_INTERPRET "$PYTHON" -m pytest benchmarks/test_bench_models.py \
        --benchmark-only -q -p no:cacheprovider --benchmark-json "$MODELS_JSON"
    # 4. the main job: ResNet-50, batch 256, bf16, channels_last; every backend.
    run_step bench-cli "$(budget 45)" env -u TRITON_INTERPRET "$PYTHON" -m resnet_fast.bench --device cuda \
        --backend all --peers none --json "$CLI_JSON"
fi

# 5. the summary: benchmarks/results/<date>-<gpu>.json and .md
run_step summary "$(budget 10)" "$PYTHON" -c 'import sys; from resnet_fast.bench import write_check_summary; write_check_summary(*sys.argv[1:])' \
    "$STEM" "$STEPS_TSV" "$CLI_JSON" "$BLOCKS_JSON" "$MODELS_JSON"
echo "gpu_check: wrote $STEM.json and $STEM.md"
[[ -f "$STEM.md" ]] && sed -n '1,12p' "$STEM.md"
exit $FAILED
