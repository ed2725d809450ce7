#!/usr/bin/env bash
# Packs what a hardware-GPU check needs into target/gpu-kit/ (git-ignored), for a machine that
# has a GPU but no Rust toolchain and no network: the release binary and the kernels test binary
# (stripped, xz-compressed), the Vulkan loader's .deb files, and the reference answer of the
# tiny package computed here on the software driver. tests/gpu-run.sh runs the checks there.
#
#   bash tests/gpu-kit.sh [debug]    # here (x86-64 Linux; needs apt-get download for the .debs);
#                                    # debug: from debug builds (CI proves the scripts run)
#   ... copy the repo with target/gpu-kit to the GPU machine ...
#   bash tests/gpu-run.sh OUTDIR     # there
#
# The kit is about 8 MB: with the tracked tree it stays under a 64 MiB copy.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=target/gpu-kit
rm -rf "$kit"
mkdir -p "$kit/gl"

profile=${1:-release}
case "$profile" in
    release) flags=(--release) dir=release level=-9 ;;
    debug) flags=() dir=debug level=-1 ;;
    *) echo "usage: bash tests/gpu-kit.sh [debug]" >&2; exit 2 ;;
esac
echo "== $profile binary and kernels tests"
cargo build -q "${flags[@]}" --bin minigpt4
kernels=$(cargo test -q "${flags[@]}" --test kernels --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kernels" and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -x "$kernels" ] || { echo "gpu-kit: the kernels test binary was not built" >&2; exit 1; }
for pair in "target/$dir/minigpt4:minigpt4" "$kernels:kernels"; do
    src=${pair%%:*} name=${pair##*:}
    cp "$src" "$kit/$name"
    strip "$kit/$name"
    xz "$level" -T2 -f "$kit/$name"
done

echo "== the Vulkan loader (.deb, for a machine whose image lacks it)"
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu-kit-apt'
mkdir -p /tmp/gpu-kit-apt/partial
# shellcheck disable=SC2086
apt-get $o update -qq >/dev/null
# shellcheck disable=SC2086
(cd "$kit/gl" && apt-get $o download -qq libvulkan1 >/dev/null 2>&1)
ls "$kit"/gl/libvulkan1_*.deb >/dev/null

echo "== the tiny package's greedy answer on the software driver (portable kernels)"
mkdir -p -m700 "${XDG_RUNTIME_DIR:=/tmp/gpu-kit-xdg}"
export XDG_RUNTIME_DIR
lavapipe=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json | head -1)
VK_ICD_FILENAMES="$lavapipe" WGPU_BACKEND=vulkan MINIGPT4_PORTABLE=1 MINIGPT4_HOME="$kit/home" \
    "./target/$dir/minigpt4" chat --model tests/fixtures/minigpt4/vicuna0_tiny_pkg \
    --image tests/fixtures/images/chelsea_q90.jpg --prompt 'What is in this picture?' \
    --greedy --max-new-tokens 12 --format json >"$kit/tiny-answer.json"
rm -rf "$kit/home"
git rev-parse --short HEAD >"$kit/commit"
du -sh "$kit"
ls -l "$kit" "$kit/gl"
