#!/usr/bin/env bash
# GPU check of the CUDA backend: the whole test suite with KVSIEVE_REQUIRE=cuda (a skip is a
# failure), then the GPU benchmark table. Fits one 10-minute call on an H200.
#
#   scripts/gpu-check.sh            build (if cargo is here) and run
#   scripts/gpu-check.sh prepare    build release test + bench binaries into target/gpu-check
#                                   (on any machine with Rust; no GPU needed)
#   scripts/gpu-check.sh run        run, using cargo if present, else target/gpu-check
#
# A GPU machine without Rust: run `prepare` where Rust is, carry `target/gpu-check`, then
# `scripts/gpu-check.sh run` there. NVRTC is looked up in KVSIEVE_NVRTC_DIR, the pip wheels,
# the CUDA toolkit folders; a libnvrtc.so.<major> of any major is linked as libnvrtc.so.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
mode="${1:-run}"
bindir=target/gpu-check

step() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'gpu-check: %s\n' "$*" >&2; exit 1; }

prepare() {
    step "build release test and bench binaries"
    rm -rf "$bindir" && mkdir -p "$bindir"
    local list
    list=$(CARGO_PROFILE_RELEASE_DEBUG=0 cargo test --release --features cuda --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
    [ -n "$list" ] || die "cargo test --no-run produced no test binaries"
    for f in $list; do cp "$f" "$bindir/test-$(basename "$f" | sed 's/-[0-9a-f]*$//')"; done
    local bench
    bench=$(CARGO_PROFILE_BENCH_DEBUG=0 cargo bench --features cuda --bench cuda --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)
    [ -n "$bench" ] || die "cargo bench --no-run produced no bench binary"
    cp "$bench" "$bindir/bench-cuda"
    strip "$bindir"/* 2>/dev/null || true
    ls -la "$bindir"
    du -sh "$bindir"
}

find_nvrtc() {
    local dirs=()
    [ -n "${KVSIEVE_NVRTC_DIR:-}" ] && dirs+=("$KVSIEVE_NVRTC_DIR")
    local py
    py=$(python3 - <<'PY' 2>/dev/null || true
import importlib, os
for mod in ("nvidia.cuda_nvrtc", "nvidia.cu13", "nvidia.cu12", "nvidia"):
    try:
        m = importlib.import_module(mod)
    except Exception:
        continue
    for p in getattr(m, "__path__", []):
        for sub in ("lib", "cuda_nvrtc/lib", "cu13/lib", "cu12/lib"):
            d = os.path.join(p, sub)
            if os.path.isdir(d):
                print(d)
PY
)
    while IFS= read -r d; do [ -n "$d" ] && dirs+=("$d"); done <<<"$py"
    dirs+=("${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64
        /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
    for d in "${dirs[@]}"; do
        local lib
        lib=$(ls "$d"/libnvrtc.so* 2>/dev/null | grep -v builtins | sort -V | tail -1 || true)
        if [ -n "$lib" ]; then
            echo "$d|$lib"
            return 0
        fi
    done
    local hit
    hit=$(find / -xdev -name 'libnvrtc.so*' -not -name '*builtins*' 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$hit" ] && echo "$(dirname "$hit")|$hit"
}

setup_env() {
    step "locate the driver, NVRTC and ptxas"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    local found
    found=$(find_nvrtc)
    [ -n "$found" ] || die "libnvrtc not found (set KVSIEVE_NVRTC_DIR)"
    local dir="${found%%|*}" lib="${found##*|}"
    # cudarc looks for libnvrtc.so and libnvrtc.so.12 (pinned cuda-12080): link whatever major is here.
    local shim=/tmp/kvsieve-nvrtc
    mkdir -p "$shim"
    ln -sf "$lib" "$shim/libnvrtc.so"
    local extra="$shim:$dir"
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
        [ -d "$d" ] && extra="$extra:$d"
    done
    export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "nvrtc: $lib"
    if [ -z "${KVSIEVE_PTXAS:-}" ]; then
        local wheel
        wheel=$(python3 -c 'import nvidia.cuda_nvcc as m; print(list(m.__path__)[0] + "/bin/ptxas")' 2>/dev/null || true)
        for p in "$(command -v ptxas || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/ptxas" /usr/local/cuda/bin/ptxas "$wheel"; do
            if [ -n "$p" ] && [ -x "$p" ]; then export KVSIEVE_PTXAS="$p"; break; fi
        done
    fi
    echo "ptxas: ${KVSIEVE_PTXAS:-none}"
    export KVSIEVE_REQUIRE=cuda
}

run_all() {
    setup_env
    local failed=0 summary=()
    if command -v cargo >/dev/null 2>&1 && [ ! -d "$bindir" ]; then
        step "build (release)"
        cargo build --release --features cuda
        step "test suite, KVSIEVE_REQUIRE=cuda"
        if timeout 360 cargo test --release --features cuda -- --test-threads 8; then
            summary+=("tests: PASS")
        else
            summary+=("tests: FAIL"); failed=1
        fi
        step "ptxas resources (cuda_compile)"
        timeout 120 cargo test --release --features cuda --test cuda_compile -- --nocapture 2>&1 |
            grep -E '^\|' || true
        step "bench"
        if timeout 240 cargo bench --features cuda --bench cuda; then
            summary+=("bench: OK")
        else
            summary+=("bench: FAIL"); failed=1
        fi
    else
        [ -d "$bindir" ] || die "no cargo and no $bindir: run 'scripts/gpu-check.sh prepare' on a machine with Rust and carry $bindir"
        step "test suite from $bindir, KVSIEVE_REQUIRE=cuda"
        for t in "$bindir"/test-*; do
            local name; name=$(basename "$t")
            local args=(--test-threads 8)
            [ "$name" = test-cuda_compile ] && args+=(--nocapture)
            printf -- '--- %s\n' "$name"
            if timeout 300 "$t" "${args[@]}"; then
                summary+=("$name: PASS")
            else
                summary+=("$name: FAIL"); failed=1
            fi
        done
        step "bench"
        if timeout 240 "$bindir/bench-cuda"; then
            summary+=("bench: OK")
        else
            summary+=("bench: FAIL"); failed=1
        fi
    fi
    step "summary"
    printf '%s\n' "${summary[@]}"
    return "$failed"
}

case "$mode" in
    prepare) prepare ;;
    run) run_all ;;
    *) die "usage: scripts/gpu-check.sh [prepare|run]" ;;
esac
