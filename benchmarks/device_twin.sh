#!/usr/bin/env bash
# The device twin: the GPU machine's software versions (torch 2.11.0, triton 3.6.0, torchvision 0.26.0,
# Python 3.12), on a CPU machine with network. What passes here will not break for a version reason on
# the GPU machine, where there is no network to fix an install and only minutes to spend.
#
# Usage:
#   bash benchmarks/device_twin.sh                       # every step
#   bash benchmarks/device_twin.sh --steps build,info    # a subset (venv and sync always run first: cheap
#                                                        # when nothing changed)
#   bash benchmarks/device_twin.sh --fresh               # recreate the venv and the source copy (cold build)
#
# Options:
#   --dir DIR        twin folder (default ${TWIN_DIR:-$HOME/.cache/resnet_fast/device-twin})
#   --steps LIST     comma-separated, from: venv,sync,build,info,tests,triton,dry-run (default: all)
#   --fresh          delete this version set's venv and source copy first
#   --python PY      base interpreter of the venv (default: a Python 3.12, as on the device; else python3)
#   --jobs N         MAX_JOBS of the build (default 2)
#   --pytest-args A  arguments for the tests step, one string: "-m 'not slow'", "tests/test_triton.py"
#                    (default: the whole suite, pyproject's testpaths)
#   --patch FILE     apply a diff (git apply, paths from the repository root) to the source copy after each
#                    sync, to try a fix before it lands in this checkout (repeatable)
#   -v, --verbose    stream each step's output (default: log file, and its tail after the step)
#   -h, --help       this text
#
# Steps: venv (create or reuse the venv keyed by the versions), sync (copy `git ls-files -co
# --exclude-standard` to DIR/src-KEY: builds there never touch this checkout's resnet_fast/_C*.so), build
# (pip install --no-build-isolation --no-deps -e . with TORCH_CUDA_ARCH_LIST=9.0), info (`resnet-fast
# info`; the CUDA kernels must be in, for sm_90), tests (the whole CPU suite, every failure reported),
# triton (the Triton interpreter tests ran, none skipped), dry-run (benchmarks/gpu_check.sh --dry-run).
# Logs in DIR/logs/; exit status non-zero when any step failed.

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The GPU machine's versions (see the design notes); the CUDA flavour is the one PyPI's torch 2.11.0 has.
TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
TRITON_VERSION=3.6.0
DEVICE_PYTHON=3.12
CUDA_ARCHS=9.0

TWIN="${TWIN_DIR:-$HOME/.cache/resnet_fast/device-twin}"
STEPS="venv,sync,build,info,tests,triton,dry-run"
FRESH=0
BASE_PYTHON="${TWIN_PYTHON:-}"
JOBS=2
PYTEST_ARGS=""
PATCHES=()
VERBOSE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) TWIN="${2:?--dir needs a folder}"; shift ;;
        --steps) STEPS="${2:?--steps needs a list}"; shift ;;
        --fresh) FRESH=1 ;;
        --python) BASE_PYTHON="${2:?--python needs an interpreter}"; shift ;;
        --jobs) JOBS="${2:?--jobs needs a number}"; shift ;;
        --pytest-args) PYTEST_ARGS="${2?--pytest-args needs a string}"; shift ;;
        --patch) PATCHES+=("$(realpath "${2:?--patch needs a file}")"); shift ;;
        -v|--verbose) VERBOSE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "device_twin.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

KNOWN_STEPS=(venv sync build info tests triton dry-run)
IFS=',' read -r -a WANTED <<< "$STEPS"
for step in "${WANTED[@]}"; do
    [[ " ${KNOWN_STEPS[*]} " == *" $step "* ]] || { echo "device_twin.sh: unknown step '$step' (${KNOWN_STEPS[*]})" >&2; exit 2; }
done
wanted() { [[ ",venv,sync,$STEPS," == *",$1,"* ]]; }

mkdir -p "$TWIN"
TWIN="$(cd "$TWIN" && pwd)"

# --- the base interpreter: the device's Python minor when this machine has one --------------------------
pick_python() {
    local candidate
    for candidate in "python$DEVICE_PYTHON" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/$DEVICE_PYTHON.*/bin/python$DEVICE_PYTHON; do
        # pyenv shims exist for versions that are not selected and fail when run: try, do not trust `which`.
        if "$candidate" -c 'import venv, ensurepip, ssl' > /dev/null 2>&1; then
            command -v "$candidate" 2> /dev/null || echo "$candidate"
            return
        fi
    done
    command -v python3
}
[[ -n "$BASE_PYTHON" ]] || BASE_PYTHON="$(pick_python)"
BASE_VERSION="$("$BASE_PYTHON" -c 'import platform; print(platform.python_version())')" || {
    echo "device_twin.sh: cannot run $BASE_PYTHON" >&2; exit 2; }
BASE_MINOR="${BASE_VERSION%.*}"

# The numpy major of the main environment (the interpreter on PATH), so that numpy-facing code is tested
# against the same API generation.
NUMPY_MAJOR="$(python3 -c 'import numpy; print(numpy.__version__.split(".")[0])' 2> /dev/null || echo 2)"
NUMPY_SPEC="numpy==$NUMPY_MAJOR.*"
# triton 3.6's interpreter turns scalar kernel arguments into int() of a one-element array (a loop bound
# `range(0, kernel_h)`), which numpy >= 2.4 refuses; triton 3.8 squeezes first. The GPU machine does not
# interpret kernels, so this bound is the twin's own, not the device's.
[[ "$NUMPY_MAJOR" != 2 ]] || NUMPY_SPEC="numpy>=2,<2.4"

# The test extra of pyproject.toml, minus what the pins above already fix.
TEST_EXTRAS="$("$BASE_PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
pinned = {"torch", "torchvision", "triton", "numpy", "pytest", "pytest-benchmark", "ninja"}
print(" ".join(r for r in extra if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() not in pinned))
EOF
)" || { echo "device_twin.sh: cannot read the test extra of pyproject.toml" >&2; exit 2; }

CORE_REQUIREMENTS=("torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "triton==$TRITON_VERSION"
                   "$NUMPY_SPEC" "setuptools" "wheel" "pytest" "pytest-benchmark" "ninja")
read -r -a OPTIONAL_REQUIREMENTS <<< "$TEST_EXTRAS"
KEY_TEXT="python $BASE_MINOR; ${CORE_REQUIREMENTS[*]}; ${OPTIONAL_REQUIREMENTS[*]}"
KEY="py$BASE_MINOR-torch$TORCH_VERSION-$(echo "$KEY_TEXT" | sha256sum | cut -c1-8)"
VENV="$TWIN/venv-$KEY"
SRC="$TWIN/src-$KEY"
LOGS="$TWIN/logs"
TWIN_PY="$VENV/bin/python"
mkdir -p "$LOGS"

if [[ $FRESH -eq 1 ]]; then
    echo "device_twin: --fresh: removing $VENV and $SRC"
    rm -rf "$VENV" "$SRC"
fi

# --- step bookkeeping ---------------------------------------------------------------------------------------
SUMMARY=()
FAILED=0
BLOCKED=""  # a failed step that makes the later ones meaningless

# run_step NAME FUNCTION: time it, log it, record ok / FAILED / skipped.
run_step() {
    local name="$1" function="$2" log="$LOGS/$1.log" status start end took verdict
    if ! wanted "$name"; then return; fi
    if [[ -n "$BLOCKED" ]]; then
        SUMMARY+=("$(printf '%-8s  %-8s  %8s  %s' "$name" skipped - "$BLOCKED failed")")
        return
    fi
    echo "== $name"
    start=$(date +%s.%N)
    if [[ $VERBOSE -eq 1 ]]; then
        "$function" 2>&1 | tee "$log"
    else
        "$function" > "$log" 2>&1
    fi
    status=$?
    end=$(date +%s.%N)
    took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    verdict=ok
    if [[ $status -ne 0 ]]; then verdict=FAILED; FAILED=1; fi
    [[ $VERBOSE -eq 1 ]] || tail -n 12 "$log" | sed 's/^/   | /'
    echo "   -> $verdict (exit $status) in ${took}s; log: $log"
    SUMMARY+=("$(printf '%-8s  %-8s  %8s  %s' "$name" "$verdict" "$took" "$(note_of "$name")")")
    if [[ $status -ne 0 && " venv sync build " == *" $name "* ]]; then BLOCKED="$name"; fi
}
NOTES_FILE="$TWIN/.notes"
: > "$NOTES_FILE"
note() { printf '%s\t%s\n' "$1" "$2" >> "$NOTES_FILE"; }
note_of() { awk -F'\t' -v s="$1" '$1 == s { print $2 }' "$NOTES_FILE" | tail -n 1; }

# Everything below runs with the twin's tools first on PATH (its python, pip, ninja, resnet-fast).
twin_env() { env PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" PYTHONNOUSERSITE=1 "$@"; }

# --- venv -----------------------------------------------------------------------------------------------------
venv_ok() {
    [[ -x "$TWIN_PY" && -f "$VENV/.twin-key" ]] && [[ "$(cat "$VENV/.twin-key")" == "$KEY_TEXT" ]] &&
        "$TWIN_PY" -c "import torch, torchvision, triton, numpy, pytest, pytest_benchmark
assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__
assert torchvision.__version__.split('+')[0] == '$TORCHVISION_VERSION', torchvision.__version__
assert triton.__version__ == '$TRITON_VERSION', triton.__version__" 2> /dev/null
}

step_venv() {
    if venv_ok; then
        echo "reusing $VENV"
        note venv "reused $KEY"
    else
        echo "creating $VENV from $BASE_PYTHON ($BASE_VERSION)"
        rm -rf "$VENV"
        "$BASE_PYTHON" -m venv "$VENV" || return 1
        twin_env python -m pip install --upgrade pip || return 1
        # The pins as constraints too, so that no optional package can move torch, triton or numpy.
        printf '%s\n' "${CORE_REQUIREMENTS[@]:0:4}" > "$VENV/twin-constraints.txt"
        twin_env python -m pip install -c "$VENV/twin-constraints.txt" "${CORE_REQUIREMENTS[@]}" || return 1
        # The test extra, all at once, else one by one: a package without wheels for these versions is left
        # out (its tests skip) rather than failing the twin.
        local missing=()
        if [[ ${#OPTIONAL_REQUIREMENTS[@]} -gt 0 ]] &&
           ! twin_env python -m pip install -c "$VENV/twin-constraints.txt" "${OPTIONAL_REQUIREMENTS[@]}"; then
            local requirement
            for requirement in "${OPTIONAL_REQUIREMENTS[@]}"; do
                twin_env python -m pip install -c "$VENV/twin-constraints.txt" "$requirement" || missing+=("$requirement")
            done
        fi
        printf '%s\n' "${missing[@]}" > "$VENV/.twin-missing"
        venv_ok || { printf '%s' "$KEY_TEXT" > "$VENV/.twin-key"; venv_ok; } || return 1
        note venv "created $KEY"
    fi
    local missing_list
    missing_list="$(tr '\n' ' ' < "$VENV/.twin-missing" 2> /dev/null | sed 's/ *$//')"
    [[ -z "$missing_list" ]] || note venv "$(note_of venv); left out: $missing_list"
    twin_env python - <<'EOF'
import platform, sys
import numpy, torch, torchvision, triton
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"torchvision {torchvision.__version__}  triton {triton.__version__}  numpy {numpy.__version__}")
EOF
}

# --- sync -----------------------------------------------------------------------------------------------------
step_sync() {
    mkdir -p "$SRC"
    # By content: a file is rewritten only when its bytes differ from the copy's, so a file a --patch changed
    # is restored before the patch is applied again, and an unchanged one keeps its bytecode cache.
    git -C "$ROOT" ls-files -co --exclude-standard -z > "$SRC/.twin-manifest.new" || return 1
    python3 - "$ROOT" "$SRC" <<'EOF_SYNC' || return 1
import filecmp, os, shutil, sys
root, src = sys.argv[1], sys.argv[2]
manifest, new_manifest = os.path.join(src, ".twin-manifest"), os.path.join(src, ".twin-manifest.new")
with open(new_manifest, "rb") as f:
    # ls-files lists tracked files that were deleted in the working tree too.
    paths = [p.decode() for p in f.read().split(b"\0") if p and os.path.isfile(os.path.join(root, p.decode()))]
old = []
if os.path.exists(manifest):
    with open(manifest) as f:
        old = f.read().splitlines()
copied = 0
for path in paths:
    source, target = os.path.join(root, path), os.path.join(src, path)
    if os.path.isfile(target) and filecmp.cmp(source, target, shallow=False):
        continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target)
    shutil.copymode(source, target)
    copied += 1
removed = sorted(set(old) - set(paths))
for path in removed:
    if os.path.isfile(os.path.join(src, path)):
        os.remove(os.path.join(src, path))
with open(manifest, "w") as f:
    f.write("\n".join(paths) + "\n")
os.remove(new_manifest)
print(f"{len(paths)} files: {copied} copied, {len(paths) - copied} unchanged, {len(removed)} removed"
      + (f" ({', '.join(removed)})" if removed else ""))
EOF_SYNC
    local patch
    for patch in "${PATCHES[@]}"; do
        # Applied to the copy only, to try a fix in files this checkout must not change yet; the next sync
        # restores those files (their bytes differ again) before the patch is reapplied.
        (cd "$SRC" && git apply --verbose "$patch") || { echo "sync: $patch does not apply"; return 1; }
    done
    note sync "$(wc -l < "$SRC/.twin-manifest") files${PATCHES:+, ${#PATCHES[@]} patch(es) applied}"
}

# --- build ----------------------------------------------------------------------------------------------------
step_build() {
    cd "$SRC" || return 1
    # A full build every time, as on the device: pip's editable build compiles in a fresh temporary folder.
    # RESNET_FAST_BUILD_CUDA=1 turns a silently CPU-only build into a failure.
    twin_env TORCH_CUDA_ARCH_LIST="$CUDA_ARCHS" MAX_JOBS="$JOBS" RESNET_FAST_BUILD_CUDA=1 \
        python -m pip install --no-build-isolation --no-deps -v -e . || return 1
    local library
    library="$(ls "$SRC"/resnet_fast/_C*.so 2> /dev/null | head -n 1)"
    [[ -n "$library" ]] || { echo "no resnet_fast/_C*.so in $SRC"; return 1; }
    echo "built $library"
    note build "$(basename "$library")"
}

# --- info -----------------------------------------------------------------------------------------------------
step_info() {
    cd "$SRC" || return 1
    twin_env resnet-fast info || return 1
    twin_env resnet-fast info --json > "$LOGS/info.json" || return 1
    twin_env python - "$LOGS/info.json" "$CUDA_ARCHS" "$TORCH_VERSION" "$TRITON_VERSION" <<'EOF' || return 1
import json, sys
report, arch, torch_version, triton_version = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
ext = report["extension"]
problems = []
if not ext["loaded"]:
    problems.append(f"the extension did not load: {ext['error']}")
elif not ext["cuda"]:
    problems.append("the extension has no CUDA kernels")
elif arch not in [a.strip() for a in str(ext["cuda_archs"]).replace(";", ",").split(",")]:
    problems.append(f"CUDA kernels built for {ext['cuda_archs']!r}, not {arch}")
if report["torch"].split("+")[0] != torch_version:
    problems.append(f"torch {report['torch']}, not {torch_version}")
if report["triton"] != triton_version:
    problems.append(f"triton {report['triton']}, not {triton_version}")
for problem in problems:
    print("info:", problem)
sys.exit(1 if problems else 0)
EOF
    # The recorded archs are what setup.py was asked for; the library's ELF sections are what nvcc made.
    # Triton's wheel carries a cuobjdump for toolkits installed without one.
    local cuobjdump="" sm="sm_${CUDA_ARCHS/./}" candidate
    for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" "$(command -v cuobjdump)" \
                     "$VENV"/lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then cuobjdump="$candidate"; break; fi
    done
    if [[ -n "$cuobjdump" ]]; then
        "$cuobjdump" --list-elf "$SRC"/resnet_fast/_C*.so | tee "$LOGS/info-elf.txt" | grep -q "$sm" ||
            { echo "info: no $sm code in the library (cuobjdump --list-elf)"; return 1; }
        note info "CUDA kernels for $sm ($(grep -c "$sm" "$LOGS/info-elf.txt") ELF images)"
    else
        note info "cuda_archs $CUDA_ARCHS (no cuobjdump to check the ELF)"
    fi
}

# --- tests ----------------------------------------------------------------------------------------------------
# A pytest plugin (kept outside the repository) that writes every test's outcome and markers as JSON, so the
# summary can count failures and the triton step can tell "ran" from "skipped".
write_plugin() {
    mkdir -p "$TWIN/plugins"
    cat > "$TWIN/plugins/twin_report.py" <<'EOF'
import json
import os

_markers = {}
_results = {}


def pytest_collection_finish(session):
    for item in session.items:
        _markers[item.nodeid] = sorted({mark.name for mark in item.iter_markers()})


def pytest_runtest_logreport(report):
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "reason": "", "seconds": 0.0})
    entry["seconds"] += report.duration
    if report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        longrepr = report.longrepr
        entry["reason"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    elif report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr or "")
        entry["reason"] = " ".join(text.split())[:240]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TWIN_REPORT")
    if not path:
        return
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    tests = [dict(nodeid=nodeid, markers=_markers.get(nodeid, []), **result) for nodeid, result in _results.items()]
    with open(path, "w") as f:
        json.dump({"exitstatus": int(exitstatus), "triton": triton_version,
                   "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "tests": tests}, f, indent=1)
EOF
}

# count_outcomes REPORT [MARK_EXPRESSION_IN_PYTHON]: "N passed, M failed, ..." and the failures, one a line.
count_outcomes() {
    python3 - "$1" <<'EOF'
import collections, json, sys
report = json.load(open(sys.argv[1]))
counts = collections.Counter(t["outcome"] for t in report["tests"])
print(", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped", "xfailed") if counts[k]))
for t in report["tests"]:
    if t["outcome"] in ("failed", "error"):
        print(f"  {t['outcome'].upper()} {t['nodeid']}: {t['reason']}", file=sys.stderr)
EOF
}

run_pytest() {
    local report="$1"
    shift
    cd "$SRC" || return 1
    write_plugin
    rm -f "$report"
    # RESNET_FAST_EXPECT_CUDA_KERNELS=1: the tests demand the CUDA kernels that this build must have.
    twin_env PYTHONPATH="$TWIN/plugins${PYTHONPATH:+:$PYTHONPATH}" TWIN_REPORT="$report" \
        RESNET_FAST_EXPECT_CUDA_KERNELS=1 \
        python -m pytest -q -p no:cacheprovider -p twin_report "$@"
}

step_tests() {
    # No -x: every failure on these versions is worth knowing in one run.
    local status extra=()
    rm -f "$LOGS/tests-failures.txt"
    # Shell words, so that quoted marker expressions survive: --pytest-args "-m 'not slow'". No path given
    # here: pytest then runs pyproject's testpaths, or the files the arguments name.
    eval "extra=($PYTEST_ARGS)"
    run_pytest "$LOGS/tests.json" --durations=15 "${extra[@]}"
    status=$?
    if [[ -f "$LOGS/tests.json" ]]; then
        note tests "$(count_outcomes "$LOGS/tests.json" 2> "$LOGS/tests-failures.txt")"
        cat "$LOGS/tests-failures.txt"
    else
        note tests "pytest wrote no report (exit $status)"
    fi
    return $status
}

# --- triton ---------------------------------------------------------------------------------------------------
step_triton() {
    local report="$LOGS/tests.json"
    # Reuse this run's suite when it was the whole one; else run the triton-marked tests alone.
    if ! wanted tests || [[ -n "$PYTEST_ARGS" || ! -f "$report" ]]; then
        report="$LOGS/triton.json"
        run_pytest "$report" -m triton
    fi
    [[ -f "$report" ]] || { echo "triton: pytest wrote no report"; return 1; }
    local summary
    summary="$(python3 - "$report" "$TRITON_VERSION" <<'EOF'
import collections, json, sys
report, expected = json.load(open(sys.argv[1])), sys.argv[2]
triton_tests = [t for t in report["tests"] if "triton" in t["markers"]]
# cuda-marked triton tests need a GPU: skipped here by design, run by gpu_check.sh.
cpu = [t for t in triton_tests if "cuda" not in t["markers"]]
counts = collections.Counter(t["outcome"] for t in cpu)
bad = [t for t in cpu if t["outcome"] not in ("passed", "xfailed")]
problems = []
if report["triton"] != expected:
    problems.append(f"triton {report['triton']} in the test process, not {expected}")
if report["TRITON_INTERPRET"] != "1":
    problems.append(f"TRITON_INTERPRET={report['TRITON_INTERPRET']!r} in the test process, not '1'")
if not cpu:
    problems.append("no triton-marked CPU tests were collected")
for t in bad:
    problems.append(f"{t['outcome']}: {t['nodeid']}: {t['reason']}")
gpu_only = sum(1 for t in triton_tests if "cuda" in t["markers"])
print(f"{counts['passed']}/{len(cpu)} triton-marked CPU tests passed under triton {report['triton']}"
      f" ({gpu_only} cuda-marked left to the GPU)")
for problem in problems:
    print("  " + problem, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
)"
    local status=$?
    echo "$summary"
    note triton "$summary"
    return $status
}

# --- dry-run --------------------------------------------------------------------------------------------------
step_dry_run() {
    cd "$SRC" || return 1
    rm -rf "$TWIN/dry-run"
    twin_env PYTHON="$TWIN_PY" bash benchmarks/gpu_check.sh --dry-run --out "$TWIN/dry-run"
}

# --- main -----------------------------------------------------------------------------------------------------
echo "device_twin: $TWIN ($KEY), source $ROOT"
echo "  base python $BASE_PYTHON ($BASE_VERSION; the device has $DEVICE_PYTHON.3), $NUMPY_SPEC, steps $STEPS"
[[ "$BASE_MINOR" == "$DEVICE_PYTHON" ]] || echo "  warning: no Python $DEVICE_PYTHON here; the twin uses $BASE_VERSION"
TOTAL_START=$(date +%s.%N)
run_step venv step_venv
run_step sync step_sync
run_step build step_build
run_step info step_info
run_step tests step_tests
run_step triton step_triton
run_step dry-run step_dry_run
TOTAL=$(awk -v a="$TOTAL_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

echo
echo "device twin summary ($("$TWIN_PY" -c 'import platform, torch, triton, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, triton {triton.__version__}")' 2> /dev/null || echo "no venv"))"
printf '%-8s  %-8s  %8s  %s\n' step status seconds note
printf '%s\n' "${SUMMARY[@]}"
printf '%-8s  %-8s  %8s\n' total "$([[ $FAILED -eq 0 ]] && echo ok || echo FAILED)" "$TOTAL"
if wanted tests && [[ -s "$LOGS/tests-failures.txt" ]]; then
    echo "failures ($(wc -l < "$LOGS/tests-failures.txt"), first 40; all in $LOGS/tests-failures.txt):"
    head -n 40 "$LOGS/tests-failures.txt"
fi
exit $FAILED
