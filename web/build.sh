#!/usr/bin/env bash
# Builds the library for the browser (wasm32, WebGPU backend).
# The page, the wasm-bindgen step and the JS API arrive with the in-browser chat issue; until
# then this proves that the runtime (wgpu + kernels) compiles for wasm32-unknown-unknown.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
profile="${1:-release}"
if [ "$profile" = release ]; then
    cargo build --lib --release --target wasm32-unknown-unknown
else
    cargo build --lib --target wasm32-unknown-unknown
fi
ls -l target/wasm32-unknown-unknown/"$profile"/minigpt4.wasm
