#!/usr/bin/env bash
# Runs every fuzz target listed in fuzz/Cargo.toml for $1 seconds (default 60)
# each. Exits non-zero if a target fails to build or finds a crash; a crashing
# input is saved under fuzz/artifacts/<target>/.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). On stable Rust,
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags
# (-Zsanitizer=address, sanitizer coverage).
set -u
cd "$(dirname "$0")"
secs="${1:-60}"
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

failed=()
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    extra=()
    [ -d "seeds/$target" ] && extra+=("seeds/$target")
    opts=(-max_total_time="$secs")
    [ -f "dicts/$target.dict" ] && opts+=(-dict="dicts/$target.dict")
    echo "== fuzz $target for ${secs}s"
    if ! cargo fuzz run "$target" "corpus/$target" "${extra[@]}" -- "${opts[@]}"; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: no crash in $(cargo fuzz list | wc -l) targets, ${secs}s each"
