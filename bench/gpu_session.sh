#!/usr/bin/env bash
# One GPU session in one command: environment, CUDA extension build, GPU tests, benchmark sweep, summary.
#
#   bench/gpu_session.sh [OUT_DIR [BUDGET_SECONDS]]     on the lent GPU machine (defaults: "$OUT", 540)
#   bench/gpu_session.sh --prepare [BUDGET_SECONDS]     here, before: fetch the wheels into .whl/, print the call
#
# Run from anywhere; it works in the repository root. Every step has its own timeout inside BUDGET_SECONDS and
# writes its log even when it fails or times out; a step with too little time left is skipped with a message.
# At most 8 files land in OUT_DIR: env.txt, cuda_build.txt, gpu_tests.txt, gpu_tests.xml, bench.txt,
# bench_README.md, bench_results.tar.gz, summary.txt. bench/gpu_session.md says how a session calls it.
#
# Steps: 1 env (env.txt)  2 setup: wheels from .whl/, PYTHONPATH (env.txt)  3 build: JIT-compile the CUDA
# extension, in the background while the Triton GPU tests run (cuda_build.txt)  4 tests: pytest -m gpu, the
# CUDA-extension tests in a second process so that a crash of those kernels cannot take the Triton results with
# it (gpu_tests.txt, gpu_tests.xml)  5 bench: python -m bench sweep --preset gpu, one part per process with
# --only/--resume and --budget-minutes sized to the time left (bench.txt, bench_README.md, bench_results.tar.gz)
# 6 summary (summary.txt, and stdout).
#
# Environment (all optional):
#   RANK1_COMMIT, RANK1_TREE_DIRTY  commit of the copied tree and whether it had uncommitted changes (0/1); the
#                                   copy has no .git, so pass them from the checkout (--prepare prints them)
#   RANK1_GPU_SESSION_DRY=1         CPU dry run: --preset tiny, a few quick tests instead of -m gpu, no nvidia-smi
#   RANK1_GPU_SESSION_STEPS         steps to run, default env,setup,build,tests,bench
#   RANK1_GPU_SESSION_WORK          scratch folder, default build/gpu_session (ignored by git; it survives between
#                                   calls while the machine stays warm: extension build, Triton cache, results)
#   RANK1_BENCH_PARTS               parts in the order to run them (default gpu: targets,ago,vit-b16,step,tokens,
#                                   dropout,dtypes,vit-l14,llm-4096)
#   RANK1_BENCH_RESUME=1            keep the results already in the scratch folder and skip the parts they hold
#                                   complete (a second call on the same warm machine); =DIR: start from the results
#                                   in DIR (e.g. bench/results/nvidia-h200, committed by an earlier session)
#   RANK1_BENCH_CUDA=auto|1|0       time pool[cuda] in the bench: auto = if it built and its GPU tests showed no
#                                   crash (illegal address, device-side assert, ...), which would poison the process
#   RANK1_PYTEST_WORKERS            pytest-xdist workers for the non-CUDA-extension GPU tests (default 8 when
#                                   pytest-xdist is importable, 0 in the dry run): most of their time is Triton
#                                   compiling kernels on the CPU, and the host has 16 cores
#   RANK1_TESTS_A_SECONDS, RANK1_TESTS_B_SECONDS, RANK1_BUILD_SECONDS   caps of those steps' timeouts
#   PYTHON                          the interpreter (default python3; in the dry run .venv/bin/python if present)
#   RANK1_NVCC=none                 act as if nvcc were absent (to test that path)

set -uo pipefail # no -e: every step runs and logs even after an earlier one failed

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4) # missing on the H200 image (KINDS.md); open_clip for `step`

# ---- --prepare: run here, not on the device ---------------------------------------------------------------------
if [[ "${1:-}" == "--prepare" ]]; then
    budget="${2:-540}"
    pyhere="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
    have=1
    for spec in "${WHEELS[@]}"; do
        compgen -G ".whl/${spec%%==*}-${spec##*==}-*.whl" >/dev/null || have=0
    done
    if [[ $have == 0 ]]; then
        "$pyhere" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "${WHEELS[@]}" || echo "pip download failed: the step part will fail without open_clip" >&2
    fi
    ls -1 .whl 2>/dev/null | sed 's/^/  .whl\//'
    git check-ignore -q .whl || echo "warning: .whl/ is not ignored by git; add /.whl/ to .gitignore" >&2
    commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    dirty=0
    [[ -n "$(git status --porcelain 2>/dev/null)" ]] && dirty=1
    echo "device tool call (run):"
    echo "  command:   RANK1_COMMIT=$commit RANK1_TREE_DIRTY=$dirty bash bench/gpu_session.sh \"\$OUT\" $budget"
    echo "  timeout_s: $((budget + 60))"
    echo "  carry:     [\".whl\"]"
    exit 0
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi

OUT_DIR="${1:-${OUT:-}}"
BUDGET="${2:-540}"
if [[ -z "$OUT_DIR" || ! "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "usage: bench/gpu_session.sh OUT_DIR [BUDGET_SECONDS]   (OUT_DIR defaults to \$OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
DRY="${RANK1_GPU_SESSION_DRY:-0}"
STEPS=",${RANK1_GPU_SESSION_STEPS:-env,setup,build,tests,bench},"
WORK="${RANK1_GPU_SESSION_WORK:-$REPO/build/gpu_session}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
if [[ $DRY == 1 ]]; then
    PY="${PYTHON:-$([[ -x .venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}"
    PRESET=tiny
else
    PY="${PYTHON:-python3}"
    PRESET=gpu
fi
RESERVE=25 # seconds kept for packing and the summary at the end

ENV_LOG="$OUT_DIR/env.txt"
BUILD_LOG="$OUT_DIR/cuda_build.txt"
TEST_LOG="$OUT_DIR/gpu_tests.txt"
TEST_XML="$OUT_DIR/gpu_tests.xml"
BENCH_LOG="$OUT_DIR/bench.txt"
BENCH_README="$OUT_DIR/bench_README.md"
BENCH_TAR="$OUT_DIR/bench_results.tar.gz"
SUMMARY="$OUT_DIR/summary.txt"
RESULTS="$WORK/results"
RESULTS_ARG="${RESULTS#"$REPO"/}" # relative to the repo root when inside it: the results README quotes --out
STATE="$WORK/state"
mkdir -p "$STATE"
rm -f "$STATE"/steps.tsv "$STATE"/parts.tsv "$STATE"/junit_*.xml "$STATE"/build.pid

export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"
JIT_DIR="$TORCH_EXTENSIONS_DIR/rank1_kernels_cuda_jit" # where rank1_kernels.cuda_jit.load() builds
export MPLBACKEND=Agg

now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
elapsed() { echo $(($(now) - START)); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_session +$(elapsed)s] $*"; }
wants() { [[ "$STEPS" == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STATE/steps.tsv"; } # step status rc secs note
status_of() { # rc -> ok / failed / timed out
    case "$1" in
        0) echo ok ;;
        124 | 137) echo "timed out" ;;
        *) echo failed ;;
    esac
}
# run_logged LOG SECONDS CMD...: the command under `timeout` (signal $SIG, TERM unless set: pytest gets INT, so it
# still writes its report; SIGKILL 20 s later), output appended to LOG; returns its status (124/137: timed out).
run_logged() {
    local log="$1" seconds="$2"
    shift 2
    local arg shown=()
    for arg in "$@"; do # inline Python scripts shown by their first words
        if [[ "$arg" == *$'\n'* || ${#arg} -gt 100 ]]; then arg="'$(echo "${arg//$'\n'/ }" | cut -c1-40)...'"; fi
        shown+=("$arg")
    done
    echo "\$ ${shown[*]}   (timeout ${seconds}s, $(date -u +%H:%M:%S) UTC)" >>"$log"
    # in the background and waited for, so that a signal to this script is handled at once (on_signal)
    timeout -s "${SIG:-TERM}" -k 20 "$seconds" "$@" >>"$log" 2>&1 </dev/null &
    CHILD_PID=$!
    [[ -n "${PIDFILE:-}" ]] && echo "$CHILD_PID" >"$PIDFILE"
    wait "$CHILD_PID"
    local rc=$?
    CHILD_PID=""
    [[ $rc == 124 || $rc == 137 ]] && echo "!! timed out after ${seconds}s (gpu_session.sh step timeout)" >>"$log"
    return $rc
}
skip_log() { # LOG STEP WHY: a skipped step still leaves its log
    echo "skipped: $3" >>"$1"
    record "$2" skipped - 0 "$3"
    say "$2: skipped: $3"
}

BUILD_PID=""
CHILD_PID=""
FINALIZED=0
on_signal() { # stop the running steps (SIGINT: pytest still writes its report), then write the summary
    trap '' INT TERM
    say "interrupted: stopping the running steps, then the summary"
    local pids=() pid i
    for pid in "$CHILD_PID" "$(cat "$STATE/build.pid" 2>/dev/null)"; do
        [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && pids+=("$pid") && kill -INT "$pid" 2>/dev/null
    done
    for i in 1 2 3 4 5 6 7 8 9 10; do
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=""; done
        [[ -z "${pid:-}" ]] && break
        sleep 1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    rm -f "$JIT_DIR/lock" # an interrupted build leaves it, and the next load() would wait on it forever
    record interrupted signal - "$(elapsed)" "the script was signalled; steps after this point did not run"
    finalize
    exit 130
}
trap on_signal INT TERM

# ---- the summary (step 6), defined first so that a signal can write it at any point -----------------------------
SUMMARY_PY='
import json, os, sys, xml.etree.ElementTree as ET
state, results = sys.argv[1], sys.argv[2]
lines = []
for label, name in (("A (GPU tests without the CUDA extension)", "junit_a.xml"), ("B (CUDA extension)", "junit_b.xml")):
    path = os.path.join(state, name)
    if not os.path.exists(path):
        lines.append(f"tests {label}: no JUnit report (not run, or killed)")
        continue
    try:
        root = ET.parse(path).getroot()
    except Exception as exc:
        lines.append(f"tests {label}: unreadable report ({exc})")
        continue
    suites = [root] if root.tag == "testsuite" else list(root)
    total, failures, errors, skipped = (sum(int(s.get(key, 0)) for s in suites)
                                        for key in ("tests", "failures", "errors", "skipped"))
    passed = total - failures - errors - skipped
    lines.append(f"tests {label}: {passed} passed, {failures} failed, {errors} errors, {skipped} skipped of {total}")
    bad = [case.get("classname", "") + "::" + case.get("name", "") for s in suites for case in s.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    lines += ["    not passed: " + name for name in bad[:25]]
    if len(bad) > 25:
        lines.append(f"    ... and {len(bad) - 25} more (gpu_tests.xml)")
path = os.path.join(results, "results.json")
if os.path.exists(path):
    with open(path) as handle:
        document = json.load(handle)
    env, conditions, rows = document["environment"], document["conditions"], document["results"]
    device = env.get("device", "?")
    slug = "cpu" if env.get("device_type") != "cuda" else "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    # Where the rows came from, from the rows themselves: environment is only the last writer of the file.
    sources = {}
    for row in rows:
        key = (row.get("commit"), row.get("device"), row.get("torch"), row.get("triton"))
        sources.setdefault(key, []).append(row.get("group"))
    lines.append(f"bench: {len(rows)} rows" + (" from MORE THAN ONE RUN; compare rows of one run only" if len(sources) > 1 else ""))
    for (commit, where, torch_version, triton_version), groups in sources.items():
        names = ", ".join(dict.fromkeys(map(str, groups)))
        lines.append(f"    {len(groups)} rows of commit {commit} on {where}, torch {torch_version}, triton {triton_version}"
                     f" (parts {names})")
    lines.append(f"    unpack: mkdir -p bench/results/{slug} && tar -xzf bench_results.tar.gz -C bench/results/{slug}")
    latest = {}
    for run in [*conditions.get("earlier_runs", []), conditions]:
        for part in run.get("parts", []):
            latest[part] = run
    for part, run in latest.items():
        part_rows = [row for row in rows if row.get("group") == part or row.get("section") == part]
        ok = sum(1 for row in part_rows if row.get("status") == "ok")
        skipped = run.get("skipped_for_time") or []
        failed = (run.get("failed_parts") or {}).get(part)
        if failed:
            word = "FAILED: " + failed
        elif part in (run.get("incomplete_parts") or []):
            word = "INCOMPLETE (stopped before its end: killed, or still running when this was written)"
        elif skipped:
            word = f"partial, {len(skipped)} groups skipped for time"
        else:
            word = "complete"
        lines.append(f"    part {part}: {word}; {ok} ok rows of {len(part_rows)}")
else:
    lines.append("bench: no results.json")
print("\n".join(lines))
'
JUNIT_PY='
import sys, xml.etree.ElementTree as ET
out, parts = sys.argv[1], sys.argv[2:]
root = ET.Element("testsuites")
for path in parts:
    try:
        tree = ET.parse(path).getroot()
    except Exception as exc:
        print(f"{path}: unreadable ({exc})")
        continue
    for suite in [tree] if tree.tag == "testsuite" else list(tree):
        suite.set("name", suite.get("name", "pytest") + ("-A" if path.endswith("_a.xml") else "-B"))
        root.append(suite)
ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
'
# Redraw the reports from results.json (a part killed mid-way leaves README/table/CSV of an older state), then pack
# them into $OUT: after every part and from finalize, so a session stopped by a signal still hands its rows back.
pack_results() {
    [[ -f "$RESULTS/results.json" ]] || return 0
    timeout 120 "$PY" -m bench report --out "$RESULTS_ARG" >/dev/null 2>>"$BENCH_LOG" ||
        echo "bench report failed: README/table/CSV may be older than results.json" >>"$BENCH_LOG"
    rm -f "$BENCH_TAR"
    tar -czf "$BENCH_TAR" -C "$RESULTS" . 2>>"$BENCH_LOG"
    if (($(stat -c %s "$BENCH_TAR") > 15 * 1024 * 1024)); then
        tar -czf "$BENCH_TAR" -C "$RESULTS" --exclude='*.png' . 2>>"$BENCH_LOG"
        echo "bench_results.tar.gz over 15 MiB with the plots: packed without them" >>"$BENCH_LOG"
    fi
    [[ -f "$RESULTS/README.md" ]] && cp "$RESULTS/README.md" "$BENCH_README"
    return 0
}
finalize() {
    ((FINALIZED)) && return 0
    FINALIZED=1
    trap - INT TERM
    local junits=() x
    for x in "$STATE/junit_a.xml" "$STATE/junit_b.xml"; do [[ -f "$x" ]] && junits+=("$x"); done
    if ((${#junits[@]})); then "$PY" -c "$JUNIT_PY" "$TEST_XML" "${junits[@]}" >>"$TEST_LOG" 2>&1; fi
    wants bench && pack_results
    {
        echo "gpu_session.sh summary: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), ${BUDGET}s budget, $(elapsed)s used," \
            "dry=$DRY, preset=$PRESET, commit ${RANK1_COMMIT:-unknown}"
        echo "steps (step, status, rc, seconds, note):"
        [[ -f "$STATE/steps.tsv" ]] && sed 's/^/  /; s/\t/ | /g' "$STATE/steps.tsv"
        if [[ -f "$STATE/parts.tsv" ]]; then
            echo "bench parts (part, what happened, rc, seconds):"
            sed 's/^/  /; s/\t/ | /g' "$STATE/parts.tsv"
        fi
        wants bench || echo "(bench not run in this call: the results below are from an earlier one)"
        "$PY" -c "$SUMMARY_PY" "$STATE" "$RESULTS" 2>&1 || echo "(summary helper failed)"
    } >"$SUMMARY" 2>&1
    local f
    for f in "$OUT_DIR"/*; do # every file must come back: at most 16 MiB each
        [[ -f "$f" ]] && (($(stat -c %s "$f") > 15 * 1024 * 1024)) && {
            tail -c 15M "$f" >"$f.tmp" && mv "$f.tmp" "$f" && echo "${f##*/}: cut to its last 15 MiB" >>"$SUMMARY"
        }
    done
    local count
    count=$(find "$OUT_DIR" -type f | wc -l)
    {
        echo "files in OUT ($count; at most 8 come back):"
        (cd "$OUT_DIR" && find . -type f -printf '  %P %s bytes\n' | sort)
        ((count > 8)) && echo "WARNING: more than 8 files in $OUT_DIR: some will not come back"
    } >>"$SUMMARY"
    echo "=================== summary ==================="
    cat "$SUMMARY"
}
say "out=$OUT_DIR budget=${BUDGET}s dry=$DRY preset=$PRESET work=$WORK python=$PY steps=${STEPS:1:-1}"

# ---- 1. environment ----------------------------------------------------------------------------------------------
: >"$ENV_LOG"
wants env || echo "step env not requested (RANK1_GPU_SESSION_STEPS)" >>"$ENV_LOG"
PYBIN="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)"
[[ -n "$PYBIN" ]] && export PATH="$PYBIN:$PATH" # ninja (torch's JIT needs it) is installed beside the interpreter
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH="$PATH:/usr/local/cuda/bin"; fi
NVCC="$(command -v nvcc || true)"
[[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] && NVCC="$CUDA_HOME/bin/nvcc"
[[ "${RANK1_NVCC:-}" == none ]] && NVCC=""

if [[ -e .git ]] && command -v git >/dev/null && git rev-parse HEAD >/dev/null 2>&1; then # git wins, as in bench/
    RANK1_COMMIT="$(git rev-parse HEAD)"
    [[ -n "$(git status --porcelain 2>/dev/null)" ]] && RANK1_TREE_DIRTY=1 || RANK1_TREE_DIRTY=0
fi
export RANK1_COMMIT="${RANK1_COMMIT:-}" RANK1_TREE_DIRTY="${RANK1_TREE_DIRTY:-}"
# The extension's "built, and run 4B showed no crash" marks belong to the code they were made for.
if [[ "$(cat "$STATE/commit" 2>/dev/null)" != "$RANK1_COMMIT/$RANK1_TREE_DIRTY" ]]; then
    rm -f "$STATE/cuda_built" "$STATE/cuda_safe"
    echo "$RANK1_COMMIT/$RANK1_TREE_DIRTY" >"$STATE/commit"
fi

ENV_PY='
import importlib.metadata as md, os, platform, sys
print("python", sys.version.replace("\n", " "), "at", sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
              "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1),
              "L2 MiB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
except Exception as exc:
    print("torch: import failed:", type(exc).__name__, exc)
names = ["torch", "triton", "numpy", "open_clip_torch", "ftfy", "wcwidth", "timm", "peft", "safetensors",
         "transformers", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "matplotlib", "ninja",
         "setuptools", "wheel", "huggingface-hub", "rank1-kernels"]
for name in names:
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
'
if wants env; then
    t0=$(now)
    {
        echo "== gpu_session.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET}s, dry=$DRY, preset=$PRESET"
        echo "== host: $(uname -a)"
        echo "   cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)"
        free -g 2>/dev/null | sed 's/^/   /'
        df -h "$REPO" 2>/dev/null | sed 's/^/   /'
        if [[ -e .git ]] && command -v git >/dev/null; then
            echo "== commit (git): $(git rev-parse HEAD 2>/dev/null) dirty=$RANK1_TREE_DIRTY"
            git log -1 --format='   %h %ad %s' --date=iso 2>/dev/null
        else
            echo "== commit (RANK1_COMMIT, no .git here): ${RANK1_COMMIT:-unknown} dirty=${RANK1_TREE_DIRTY:-unknown}"
        fi
        echo "== nvidia-smi"
    } >>"$ENV_LOG" 2>&1
    if [[ $DRY == 1 ]]; then
        echo "skipped in the dry run" >>"$ENV_LOG"
    elif command -v nvidia-smi >/dev/null; then
        run_logged "$ENV_LOG" 30 nvidia-smi
        query=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu
        run_logged "$ENV_LOG" 30 nvidia-smi --format=csv --query-gpu="$query,mig.mode.current,compute_mode"
    else
        echo "nvidia-smi: not found" >>"$ENV_LOG"
    fi
    echo "== python" >>"$ENV_LOG"
    run_logged "$ENV_LOG" 60 "$PY" -c "$ENV_PY"
    echo "== nvcc: ${NVCC:-not found}" >>"$ENV_LOG"
    [[ -n "$NVCC" ]] && run_logged "$ENV_LOG" 20 "$NVCC" --version
    {
        echo "== $(gcc --version 2>/dev/null | head -1 || echo 'gcc: not found')"
        echo "== ninja: $(ninja --version 2>/dev/null || echo 'not found on PATH')"
        echo "== TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
    } >>"$ENV_LOG" 2>&1
    record env ok 0 $(($(now) - t0)) ""
    say "env: done ($(($(now) - t0))s)"
fi

# ---- 2. setup: wheels carried in .whl/, then the work tree on PYTHONPATH -----------------------------------------
# No pip install of the project: the work tree is imported through PYTHONPATH, as .ci/compat does (nothing to fetch,
# nothing written into the machine's Python). Missing packages travel as wheels in .whl/ (bench/gpu_session.md).
if wants setup; then
    t0=$(now)
    echo "== setup" >>"$ENV_LOG"
    site="$WORK/site"
    note="PYTHONPATH=work tree"
    if compgen -G ".whl/*.whl" >/dev/null; then
        rm -rf "$site"
        if run_logged "$ENV_LOG" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" .whl/*.whl; then
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            note="$note; wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
        else
            note="$note; wheel install FAILED (see env.txt)"
        fi
    else
        note="$note; no .whl/ folder (open_clip may be missing: the bench's step part then fails)"
    fi
    export PYTHONPATH="$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
    echo "PYTHONPATH=$PYTHONPATH" >>"$ENV_LOG"
    check='import rank1_kernels, bench; print("imports ok:", rank1_kernels.__file__)
for name in ("rank1_cl", "open_clip"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "ok"))
    except Exception as exc:
        print(name, "NOT importable:", type(exc).__name__, exc)'
    run_logged "$ENV_LOG" 60 "$PY" -c "$check"
    rc=$?
    record setup "$(status_of $rc)" $rc $(($(now) - t0)) "$note"
    say "setup: $(status_of $rc) ($note)"
else
    export PYTHONPATH="$REPO:$REPO/python:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- 3. build the CUDA extension (background) --------------------------------------------------------------------
BUILD_PY='
import os, sys, time
t0 = time.time()
from rank1_kernels import cuda_build
print("cuda_home:", cuda_build.cuda_home(), "| arch list:", cuda_build.arch_list(), "| MAX_JOBS:", os.environ.get("MAX_JOBS"))
import rank1_kernels.cuda_jit as cuda_jit
cuda_jit.load(verbose=True)
from rank1_kernels import cuda_backend
reason = cuda_backend.extension_missing_reason()
print(f"extension_missing_reason: {reason}")
print(f"built and loaded in {time.time() - t0:.1f} s")
sys.exit(0 if reason is None else 3)
'
BUILD_STATE=none # none / no-nvcc / running / ok / failed / timed out / skipped
BUILD_T0=0
: >"$BUILD_LOG"
if wants build; then
    echo "== JIT build of the CUDA extension: rank1_kernels.cuda_jit.load(verbose=True)" >>"$BUILD_LOG"
    echo "   TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR" >>"$BUILD_LOG"
    rm -f "$JIT_DIR/lock" # a build killed on an earlier call leaves it, and load() would wait on it forever
    avail=$(($(left) - RESERVE - 60))
    build_t=$(min "${RANK1_BUILD_SECONDS:-$((BUDGET / 2))}" "$avail")
    if [[ -z "$NVCC" ]]; then
        echo "nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA extension is not built;" \
            "its GPU tests and pool[cuda] in the bench are skipped" >>"$BUILD_LOG"
        BUILD_STATE=no-nvcc
        record build skipped - 0 "nvcc not found"
        say "build: nvcc not found, going on without the CUDA extension"
    elif ((avail < 30)); then
        skip_log "$BUILD_LOG" build "only $(left)s left of the budget"
        BUILD_STATE=skipped
    else
        BUILD_T0=$(now)
        PIDFILE="$STATE/build.pid" run_logged "$BUILD_LOG" "$build_t" "$PY" -c "$BUILD_PY" &
        BUILD_PID=$!
        BUILD_STATE=running
        say "build: started in the background (timeout ${build_t}s), log cuda_build.txt"
    fi
else
    echo "not requested (RANK1_GPU_SESSION_STEPS)" >>"$BUILD_LOG"
fi

wait_build() {
    [[ "$BUILD_STATE" == running ]] || return 0
    wait "$BUILD_PID"
    local rc=$?
    BUILD_PID=""
    rm -f "$STATE/build.pid"
    BUILD_STATE="$(status_of $rc)"
    rm -f "$JIT_DIR/lock"
    record build "$BUILD_STATE" $rc $(($(now) - BUILD_T0)) "JIT, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    say "build: $BUILD_STATE (rc $rc, $(($(now) - BUILD_T0))s)"
    if [[ "$BUILD_STATE" == ok ]]; then touch "$STATE/cuda_built"; else rm -f "$STATE/cuda_built" "$STATE/cuda_safe"; fi
}

# ---- 4. GPU tests ------------------------------------------------------------------------------------------------
: >"$TEST_LOG"
WORKERS="${RANK1_PYTEST_WORKERS:-}"
if [[ -z "$WORKERS" ]]; then WORKERS=$([[ $DRY == 1 ]] && echo 0 || echo 8); fi
PYTEST_OPTS=(-q -rfE --durations=15 -p no:cacheprovider -o faulthandler_timeout=180 --continue-on-collection-errors)
HAVE_PYTEST_TIMEOUT=0
"$PY" -c 'import pytest_timeout' 2>/dev/null && HAVE_PYTEST_TIMEOUT=1 && PYTEST_OPTS+=(--timeout=240)
# pytest.main with SIGINT restored: a shell started with SIGINT ignored passes that on, and pytest writes its JUnit
# report on KeyboardInterrupt only. --session-timeout (pytest-timeout) stops between tests before the hard timeout.
PYTEST_PY='import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; sys.exit(pytest.main(sys.argv[1:]))'
pytest_run() { # LOG SECONDS JUNIT ARGS...
    local log="$1" seconds="$2" junit="$3"
    shift 3
    local soft=()
    # not with xdist: there each worker would stop on its own clock; the hard timeout's SIGINT still covers it
    if ((HAVE_PYTEST_TIMEOUT)) && [[ " $* " != *" -n "* ]]; then
        soft=(--session-timeout=$((seconds > 120 ? seconds - 30 : seconds * 3 / 4)))
    fi
    SIG=INT run_logged "$log" "$seconds" "$PY" -c "$PYTEST_PY" "${PYTEST_OPTS[@]}" "${soft[@]}" --junitxml="$junit" "$@"
}
# The GPU selections: A every test marked gpu except the CUDA extension's files, B those files' gpu tests.
GPU_A=(-m gpu tests "--ignore-glob=*/test_cuda_*.py")
GPU_B=()
compgen -G "tests/test_cuda_*.py" >/dev/null && GPU_B=(-m gpu tests/test_cuda_*.py)
if [[ $DRY == 1 ]]; then # a few quick real tests (one of them marked gpu, hence skipped) instead
    TESTS_A=(tests/test_bench.py::test_summary_statistics
        tests/test_bench.py::test_cli_time_budget_skips_groups_but_still_writes_results
        tests/test_errors.py::test_non_finite_routing_scores_on_gpu_are_checked_when_asked)
    TESTS_B=(tests/test_cuda_backend.py::test_forced_on_cpu_tensors_says_why_and_what_to_do
        tests/test_cuda_backend.py::test_build_decision)
else
    TESTS_A=("${GPU_A[@]}")
    TESTS_B=("${GPU_B[@]}")
fi
# shellcheck disable=SC2206
[[ -n "${RANK1_PYTEST_ARGS_A:-}" ]] && TESTS_A=(${RANK1_PYTEST_ARGS_A})
# shellcheck disable=SC2206
[[ -n "${RANK1_PYTEST_ARGS_B:-}" ]] && TESTS_B=(${RANK1_PYTEST_ARGS_B})
STICKY='illegal memory access|device-side assert|unspecified launch failure|misaligned address|illegal instruction'
STICKY+='|CUDA error|Fatal Python error|Segmentation fault|core dumped|!! timed out'

if wants tests; then
    # A: every GPU test except the CUDA extension's (Triton kernels, bench harness, errors)
    xdist=()
    if ((WORKERS > 0)) && "$PY" -c 'import xdist' 2>/dev/null; then xdist=(-n "$WORKERS"); fi
    avail=$(($(left) - RESERVE - 60))
    t=$(min "${RANK1_TESTS_A_SECONDS:-$((BUDGET * 33 / 100))}" "$avail")
    echo "===== run A: GPU tests without the CUDA extension ${xdist[*]}" >>"$TEST_LOG"
    if ((avail < 20)); then
        skip_log "$TEST_LOG" tests-A "only $(left)s left of the budget"
    else
        t0=$(now)
        say "tests-A: pytest ${TESTS_A[*]} ${xdist[*]} (timeout ${t}s)"
        pytest_run "$TEST_LOG" "$t" "$STATE/junit_a.xml" "${xdist[@]}" "${TESTS_A[@]}"
        rc=$?
        record tests-A "$(status_of $rc)" $rc $(($(now) - t0)) "$(tail -n 1 "$TEST_LOG" | cut -c1-150)"
        say "tests-A: rc $rc ($(($(now) - t0))s): $(tail -n 1 "$TEST_LOG" | cut -c1-150)"
    fi
    if [[ $DRY == 1 && -z "${RANK1_PYTEST_ARGS_A:-}" ]] && ((avail >= 20)); then # what a GPU run would select, collected
        for sel in A B; do
            if [[ $sel == A ]]; then args=("${GPU_A[@]}"); else args=("${GPU_B[@]}"); fi
            ((${#args[@]})) || continue
            ids="$(timeout 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider "${args[@]}" 2>&1)"
            line="selection $sel of a GPU run (${args[*]}): $(tail -n 1 <<<"$ids");"
            line+=" $(grep -c '^tests/test_cuda_' <<<"$ids") of them in tests/test_cuda_*.py"
            echo "===== dry run: $line" >>"$TEST_LOG"
            say "tests: dry run: $line"
        done
    fi
fi
wait_build
if wants tests; then
    # B: the CUDA extension's GPU tests, in their own process (a sticky CUDA error stays there)
    echo "===== run B: GPU tests of the CUDA extension" >>"$TEST_LOG"
    avail=$(($(left) - RESERVE - 60))
    t=$(min "${RANK1_TESTS_B_SECONDS:-$((BUDGET * 14 / 100))}" "$avail")
    rm -f "$STATE/cuda_safe" # set again below after a run of B without a crash signature
    if ((${#TESTS_B[@]} == 0)); then
        skip_log "$TEST_LOG" tests-B "no tests/test_cuda_*.py"
    elif [[ "$BUILD_STATE" != ok ]]; then
        skip_log "$TEST_LOG" tests-B "the CUDA extension did not build (build: $BUILD_STATE; see cuda_build.txt)"
    elif ((avail < 20)); then
        skip_log "$TEST_LOG" tests-B "only $(left)s left of the budget"
    else
        t0=$(now)
        say "tests-B: pytest ${TESTS_B[*]} (timeout ${t}s)"
        mark=$(wc -c <"$TEST_LOG")
        pytest_run "$TEST_LOG" "$t" "$STATE/junit_b.xml" "${TESTS_B[@]}"
        rc=$?
        record tests-B "$(status_of $rc)" $rc $(($(now) - t0)) "$(tail -n 1 "$TEST_LOG" | cut -c1-150)"
        say "tests-B: rc $rc ($(($(now) - t0))s): $(tail -n 1 "$TEST_LOG" | cut -c1-150)"
        if tail -c +"$((mark + 1))" "$TEST_LOG" | grep -Eq "$STICKY"; then
            rm -f "$STATE/cuda_safe"
            echo "!! gpu_session.sh: a crash signature ($STICKY) in run B:" \
                "pool[cuda] is left out of the bench (RANK1_BENCH_CUDA=1 forces it)" >>"$TEST_LOG"
        else
            touch "$STATE/cuda_safe"
        fi
    fi
else
    echo "not requested (RANK1_GPU_SESSION_STEPS)" >>"$TEST_LOG"
fi

# ---- 5. benchmark sweep ------------------------------------------------------------------------------------------
BENCH_PY='
import os, sys
if os.environ.get("RANK1_BENCH_LOAD_CUDA") == "1":
    try:
        import rank1_kernels.cuda_jit as cuda_jit
        cuda_jit.load()
        print("gpu_session: CUDA extension loaded (rank1_kernels.cuda_jit.load)", file=sys.stderr, flush=True)
    except Exception as exc:
        print(f"gpu_session: CUDA extension not loaded: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
from bench.__main__ import main
sys.exit(main(sys.argv[1:]))
'
# Parts already complete in RESULTS (the latest run of each, without groups skipped for time, a failure, or a
# stop before its end: a run writes its finished groups as it goes, with the parts not finished yet listed).
# A part measured by another commit, other code or other settings (which backends loaded: a part measured without
# pool[cuda] is not complete once the extension loads) is not complete for this one: `sweep --resume` measures its
# groups again.
DONE_PY='
import json, os, sys
try:
    document = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(0)
conditions, rows = document["conditions"], document["results"]
state = {}
for run in [*conditions.get("earlier_runs", []), conditions]:
    for part in run.get("parts", []):
        state[part] = (not run.get("skipped_for_time") and part not in run.get("failed_parts", {})
                       and part not in run.get("incomplete_parts", []))
commit = os.environ.get("RANK1_COMMIT") or None
from bench.environment import code_digest
digest = code_digest()  # the same commit with other uncommitted edits is other code
# The settings this run stamps: the sweep registers the Triton variants of the preset, and the CUDA backend is there
# when its extension is installed or the bench loads it (not loaded here: a load that fails later only makes the part
# run again).
from bench.__main__ import _loadable_backends, run_settings
from bench.presets import get_preset
if get_preset(sys.argv[2]).triton_variants:
    from bench.variants import register_triton_variants
    register_triton_variants()
backends = _loadable_backends()
if os.environ.get("RANK1_BENCH_LOAD_CUDA") == "1" and "cuda" not in backends:
    backends = sorted([*backends, "cuda"])  # the order of known_backends()
settings = run_settings(False, backends)
for part in state:
    if any((commit and row.get("commit") != commit) or row.get("code_digest") != digest
           or row.get("bench_settings") != settings for row in rows if row.get("group") == part):
        state[part] = False
print(" ".join(part for part, complete in state.items() if complete))
'
VALID_PY='import json, sys; json.load(open(sys.argv[1]))'
# The rows of one part, as (group, date) pairs: they change only when that part measured something.
PART_ROWS_PY='
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["results"]
except Exception:
    rows = []
print(sorted({(row.get("group_key"), row.get("date_utc")) for row in rows if row.get("group") == sys.argv[2]}))
'
# A part's share of the time left, by weight: `targets` (issue #3's grid, judged in the reports) first and most.
weight() {
    case "$1" in
        targets) echo 20 ;; vit-b16) echo 4 ;; vit-l14) echo 3 ;; ago | dtypes | tokens | step | llm-4096) echo 2 ;;
        *) echo 1 ;;
    esac
}
# About how long one group of the part takes on an H100/H200 (estimates: Triton compiles inside the first group):
# new groups start until its share minus this, and the timeout lets the group in flight finish.
group_seconds() {
    case "$1" in
        targets | ago | dropout | tokens) echo 15 ;; step | llm-4096) echo 60 ;; *) echo 40 ;;
    esac
}
: >"$BENCH_LOG"
if wants bench; then
    default_parts=main,tokens,ago,step # tiny
    [[ $PRESET == gpu ]] && default_parts=targets,ago,vit-b16,step,tokens,dropout,dtypes,vit-l14,llm-4096
    IFS=, read -r -a PARTS <<<"${RANK1_BENCH_PARTS:-$default_parts}"
    resume="${RANK1_BENCH_RESUME:-0}"
    if [[ "$resume" != 0 && "$resume" != 1 ]]; then # a results folder, e.g. bench/results/nvidia-h200 (committed)
        rm -rf "$RESULTS" && mkdir -p "$RESULTS"
        if [[ -f "$resume/results.json" ]]; then
            cp -r "$resume"/. "$RESULTS"/
        else
            echo "resume: no $resume/results.json, starting afresh" >>"$BENCH_LOG"
        fi
    elif [[ "$resume" == 0 ]]; then
        rm -rf "$RESULTS"
    fi
    mkdir -p "$RESULTS"
    case "${RANK1_BENCH_CUDA:-auto}" in
        1) load_cuda=1 ;;
        0) load_cuda=0 ;;
        *) load_cuda=0
           [[ -f "$STATE/cuda_built" && -f "$STATE/cuda_safe" ]] && load_cuda=1 ;;
    esac
    [[ -z "$NVCC" || "$BUILD_STATE" =~ ^(failed|timed\ out|no-nvcc)$ ]] && [[ "${RANK1_BENCH_CUDA:-auto}" != 1 ]] && load_cuda=0
    export RANK1_BENCH_LOAD_CUDA=$load_cuda
    why="no (build: $BUILD_STATE; RANK1_BENCH_CUDA=${RANK1_BENCH_CUDA:-auto})"
    echo "pool[cuda] timed: $([[ $load_cuda == 1 ]] && echo yes || echo "$why")" >>"$BENCH_LOG"
    done_parts=" "
    if [[ "$resume" != 0 && -f "$RESULTS/results.json" ]]; then
        done_parts=" $("$PY" -c "$DONE_PY" "$RESULTS/results.json" "$PRESET") "
        echo "resume: keeping the rows in $RESULTS; parts complete there:${done_parts}" >>"$BENCH_LOG"
    fi
    note="Measured by bench/gpu_session.sh: one part per process (--only/--resume) under a ${BUDGET}s session"
    note+=" budget; CUDA extension $([[ $load_cuda == 1 ]] && echo JIT-loaded || echo 'not loaded')."
    if [[ $DRY == 1 ]]; then startup=5; min_part=4; else startup=25; min_part=45; fi
    remaining_parts=()
    for part in "${PARTS[@]}"; do
        if [[ "$done_parts" == *" $part "* ]]; then
            printf '%s\t%s\t%s\t%s\n' "$part" "complete earlier" - 0 >>"$STATE/parts.tsv"
        else
            remaining_parts+=("$part")
        fi
    done
    bench_t0=$(now)
    for i in "${!remaining_parts[@]}"; do
        part="${remaining_parts[$i]}"
        room=$(($(left) - RESERVE))
        group=$(group_seconds "$part")
        [[ $DRY == 1 ]] && group=2
        need=$((startup + group + 10)) # the least that measures one group: a later, smaller part may still fit
        ((need < min_part)) && need=$min_part
        if ((room < need)); then
            echo "===== part $part: skipped, only $(left)s left of the budget (it needs ${need}s for one group)" >>"$BENCH_LOG"
            printf '%s\t%s\t%s\t%s\n' "$part" "not run (no time left)" - 0 >>"$STATE/parts.tsv"
            say "bench: $part skipped (no time left)"
            continue
        fi
        wsum=0
        for p in "${remaining_parts[@]:$i}"; do wsum=$((wsum + $(weight "$p"))); done
        share=$((room * $(weight "$part") / wsum)) # this part's fair share of the time left, at least one group's
        ((share < need)) && share=$need
        budget_s=$((share - startup - group)); ((budget_s < 1)) && budget_s=1 # new groups start only within it
        t=$(min "$room" $((share + group + 20)))                              # the group in flight may finish
        minutes=$(awk -v s="$budget_s" 'BEGIN { printf "%.2f", s / 60 }')
        echo "===== part $part: --budget-minutes $minutes, timeout ${t}s ($(left)s left)" >>"$BENCH_LOG"
        say "bench: $part (--budget-minutes $minutes, timeout ${t}s)"
        [[ -f "$RESULTS/results.json" ]] && cp "$RESULTS/results.json" "$STATE/results.json.bak"
        before="$("$PY" -c "$PART_ROWS_PY" "$RESULTS/results.json" "$part")"
        t0=$(now)
        run_logged "$BENCH_LOG" "$t" "$PY" -c "$BENCH_PY" sweep --preset "$PRESET" --only "$part" --resume \
            --out "$RESULTS_ARG" --budget-minutes "$minutes" --note "$note"
        rc=$?
        if ! "$PY" -c "$VALID_PY" "$RESULTS/results.json" 2>/dev/null; then
            if [[ -f "$STATE/results.json.bak" ]]; then
                cp "$STATE/results.json.bak" "$RESULTS/results.json"
                echo "results.json unreadable after part $part: restored the previous one" >>"$BENCH_LOG"
            fi
        fi
        rm -f "$STATE/results.json.bak"
        written=0
        [[ "$("$PY" -c "$PART_ROWS_PY" "$RESULTS/results.json" "$part")" != "$before" ]] && written=1
        rm -f "$JIT_DIR/lock" # a part killed while load() built the extension leaves it; the next would wait forever
        pack_results
        case $rc in
            0) st=ran ;;
            1) st="ran, part failed (reason in README)" ;;
            124 | 137) st="killed at its timeout ($([[ $written == 1 ]] && echo "after writing" || echo "rows lost"))" ;;
            *) st="crashed (rc $rc$([[ $written == 1 ]] && echo ", after writing its results"))" ;;
        esac
        printf '%s\t%s\t%s\t%s\n' "$part" "$st" "$rc" $(($(now) - t0)) >>"$STATE/parts.tsv"
        say "bench: $part: $st ($(($(now) - t0))s)"
    done
    record bench "$([[ -f "$RESULTS/results.json" ]] && echo ran || echo "no results")" - $(($(now) - bench_t0)) "preset $PRESET"
else
    echo "not requested (RANK1_GPU_SESSION_STEPS)" >>"$BENCH_LOG"
fi

# ---- 6. summary -----------------------------------------------------------------------------------------------
finalize
exit 0
