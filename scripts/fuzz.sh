#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a fixed time and prints the executions and
# findings of each. Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#
#   scripts/fuzz.sh            # 60 s per target
#   FUZZ_SECONDS=300 scripts/fuzz.sh frame_decoder model_loader
#   FUZZ_TARGET_DIR=/tmp/fuzz-target scripts/fuzz.sh   # where the instrumented build goes
#
# Seed corpora come from the test fixtures: the checkpoint fixture (whole, and its payload for
# the target that wraps payloads in a valid header), the shipped configs and device profiles,
# and two small models saved by target/release/pnn-train when it is built (an MLP and a CNN).
# A finding is left in fuzz/artifacts/<target>/; replay it with
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame_decoder server_requests checkpoint_reader config_parser profile_parser model_loader)
fi

corpus=fuzz/corpus
mkdir -p "$corpus"/{frame_decoder,server_requests,checkpoint_reader,config_parser,profile_parser,model_loader}
fixture=tests/fixtures/checkpoint-previous-format/checkpoint.pnn
cp "$fixture" "$corpus/checkpoint_reader/fixture.pnn"
tail -c +49 "$fixture" > "$corpus/checkpoint_reader/fixture-payload"
cp examples/configs/*.ron "$corpus/config_parser/"
cp devices/*.ron "$corpus/profile_parser/"
train=target/release/pnn-train
[ -n "${CARGO_TARGET_DIR:-}" ] && train=$CARGO_TARGET_DIR/release/pnn-train
if [ -x "$train" ] && [ ! -e "$corpus/model_loader/mlp.safetensors" ]; then
    "$train" -q --hidden 4,3 --epochs 1 --max-batches 1 --limit-test 10 \
        --save "$corpus/model_loader/mlp.safetensors" > /dev/null || true
    "$train" -q --arch cnn --channels 2,2 --proj-dim 2 --epochs 1 --max-batches 1 --limit-test 10 \
        --save "$corpus/model_loader/cnn.safetensors" > /dev/null || true
fi

printf '%-18s %12s %10s %s\n' target executions seconds findings
for t in "${targets[@]}"; do
    log=$(mktemp)
    status=0
    CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-fuzz/target} cargo +nightly fuzz run --release "$t" "$corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 > "$log" 2>&1 || status=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    found=$(ls "fuzz/artifacts/$t" 2>/dev/null | wc -l)
    printf '%-18s %12s %10s %s\n' "$t" "${runs:-?}" "$seconds" \
        "$([ "$status" -eq 0 ] && echo "none (exit 0), $found artifacts" || echo "exit $status, see $log; $found artifacts")"
done
