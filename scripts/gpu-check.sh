#!/usr/bin/env bash
# The GPU backend on a machine with a GPU: the conformance suite with PNN_REQUIRE_GPU=1 (a
# missing adapter fails instead of skipping), then the GPU benchmarks side by side with the CPU
# simulator on the same machine (s/epoch of both and their ratio): MNIST MLP, CIFAR-shaped MLP
# 3072-200x4, MNIST CNN, CIFAR-10-shaped CNN [128,128].
#
#   scripts/gpu-check.sh                      # the best adapter
#   PNN_GPU_ADAPTER=h100 scripts/gpu-check.sh # the first adapter whose name contains "h100"
#   PNN_BENCH_GPU_BATCHES=20 scripts/gpu-check.sh   # time 20 batches per side, scaled to an epoch
#
# Needs: Rust (rust-version of Cargo.toml), a Vulkan driver (NVIDIA: the proprietary driver with
# its Vulkan ICD; `vulkaninfo --summary` lists the adapters), the MNIST data (PNN_DATA_DIR or
# ./data; CIFAR-shaped configurations use random data of CIFAR's shape).
set -euo pipefail
cd "$(dirname "$0")/.."
export PNN_REQUIRE_GPU=1
echo "== Vulkan adapters"
(command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName") \
  || echo "(vulkaninfo not installed; the tests below print the adapter they run on)"
echo "== conformance of the GPU backend (PNN_REQUIRE_GPU=1)"
cargo test --release -p pnn-gpu
cargo test --release -p pnn --test gpu_conformance -- --nocapture --test-threads 1
echo "== GPU against CPU, s/epoch"
PNN_BENCH_ONLY="gpu:" cargo bench --bench speed
