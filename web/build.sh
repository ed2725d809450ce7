#!/usr/bin/env bash
# Builds the browser engine and lays out web/ ready to serve:
#   web/pkg/minigpt4.js + minigpt4_bg.wasm   (wasm-bindgen --target web)
# Usage: bash web/build.sh [release|debug]     (default release)
# Needs the wasm32 target and wasm-bindgen-cli of exactly the wasm-bindgen version in
# Cargo.lock (both installed here when missing). wasm-opt from npm's `binaryen` is used when
# found on PATH or in node_modules (Debian's binaryen is too old for wasm-bindgen's output).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ]; then
    echo "installing wasm-bindgen-cli $want (found '${have:-none}')" >&2
    cargo install wasm-bindgen-cli --version "$want"
fi
if [ "$profile" = release ]; then
    cargo rustc --lib --release --target wasm32-unknown-unknown --crate-type cdylib
else
    cargo rustc --lib --target wasm32-unknown-unknown --crate-type cdylib
fi
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
    target/wasm32-unknown-unknown/"$profile"/minigpt4.wasm
opt=""
if command -v wasm-opt >/dev/null && wasm-opt --version 2>/dev/null | grep -qE 'version (1[2-9][0-9])'; then
    opt=wasm-opt
elif [ -x node_modules/.bin/wasm-opt ]; then
    opt=node_modules/.bin/wasm-opt
fi
if [ "$profile" = release ] && [ -n "$opt" ]; then
    "$opt" -O2 --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
        --enable-mutable-globals web/pkg/minigpt4_bg.wasm -o web/pkg/minigpt4_bg.wasm
fi
ls -l web/pkg
