#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20); fails on any crash.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   scripts/fuzz.sh --build-only     # only build the targets (scripts/test.sh does this early)
# Needs cargo-fuzz (installed from crates.io when missing). The stable toolchain is
# used with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags); no nightly is needed.
# Seeds are fuzz/corpus/<target>/ (kept small, in git); what a run learns goes to a
# scratch corpus under the target dir, crashes to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=false
if [ "${1:-}" = "--build-only" ]; then build_only=true; shift; fi
secs="${1:-20}"
shift || true
export RUSTC_BOOTSTRAP=1
# FUZZ_TARGET_DIR: where fuzz builds go (instrumented: kept apart from normal builds).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/fuzz}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
(cd fuzz && cargo fuzz build --release)
if $build_only; then echo "fuzz: targets built"; exit 0; fi
failed=()
summary=()
for t in "${targets[@]}"; do
    scratch="$CARGO_TARGET_DIR/corpus/$t"
    mkdir -p "$scratch" "fuzz/artifacts/$t"
    log="$CARGO_TARGET_DIR/fuzz-$t.log"
    echo "== fuzz $t for ${secs}s (log: $log)"
    start=$(date +%s)
    # -timeout: one input taking over 10 s is a hang, reported like a crash.
    if (cd fuzz && cargo fuzz run --release "$t" "$scratch" "corpus/$t" -- \
            -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1) >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        summary+=("$t: ok, $runs runs in $(( $(date +%s) - start ))s")
    else
        tail -40 "$log"
        failed+=("$t")
        summary+=("$t: FAILED (see $log and fuzz/artifacts/$t/)")
    fi
done
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
