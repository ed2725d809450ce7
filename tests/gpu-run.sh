#!/usr/bin/env bash
# The hardware-GPU check, on a machine with no Rust toolchain and no network, from the kit that
# tests/gpu-kit.sh packed into target/gpu-kit/. Every step has its own time limit and writes
# its output to OUTDIR; a failing step is reported and the next one still runs.
#
#   bash tests/gpu-run.sh OUTDIR [--quick | --tiny]
#
# 1. the adapters (`minigpt4 info`);
# 2. the kernels tests against their CPU references, on this GPU (f16 and subgroup variants
#    where offered, the portable one always);
# 3. the tiny package's greedy answer in the portable kernels against the software driver's
#    (tokens must be equal) and in the kernels this GPU chooses (reported);
# 4. `minigpt4 bench --json` on synthetic Vicuna 7B at its real dimensions, all layers
#    (`--quick`: 4 layers, 3 runs), and the kernel profile of its image encode and decode;
# 5. image encode and prefill (4 layers) with the GEMM's forms per shape and with one form.
# Its steps' limits add up to 570 s (on a fast GPU it should take well under that). Five files come
# back: summary.txt, log.txt (every step's output), bench.json and the two tiny answers.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash tests/gpu-run.sh OUTDIR [--quick | --tiny]}
mode=${2:-} # --quick: 4 layers, 3 runs; --tiny: proves the script runs (any driver, numbers mean little)
kit=target/gpu-kit
mkdir -p "$out"
[ -f "$kit/minigpt4.xz" ] || { echo "gpu-run: no kit in $kit (run bash tests/gpu-kit.sh first)" >&2; exit 1; }
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
note "kit built at commit $(cat "$kit/commit"), run $(date -u +%FT%TZ) on $(uname -n)"

# the Vulkan loader, when the image has none; the NVIDIA driver's ICD where it is mounted
if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in "$kit"/gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json \
    /etc/vulkan/icd.d/nvidia_icd.json; do
    if [ -f "$icd" ] && [ -z "${VK_ICD_FILENAMES:-}${VK_DRIVER_FILES:-}" ]; then
        export VK_DRIVER_FILES="$icd"
        note "Vulkan driver: $icd"
        break
    fi
done
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
mkdir -p -m700 "${XDG_RUNTIME_DIR:=/tmp/gpu-run-xdg}"
export XDG_RUNTIME_DIR
export MINIGPT4_HOME=/tmp/gpu-run-home
bin=/tmp/gpu-run-bin
mkdir -p "$bin"
xz -dc "$kit/minigpt4.xz" >"$bin/minigpt4"
xz -dc "$kit/kernels.xz" >"$bin/kernels"
chmod +x "$bin/minigpt4" "$bin/kernels"

# step NAME LIMIT_S COMMAND...: its output goes to log.txt (and $tmp/NAME.log), its stdout to the
# file STDOUT names instead, when set; at most 8 files come back from a device run.
tmp=$(mktemp -d)
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS rc
    echo "== $name: $*" >>"$out/log.txt"
    if [ -n "${STDOUT:-}" ]; then
        { timeout "$limit" "$@" 2>&1 >"$STDOUT"; } | tee "$tmp/$name.log" >>"$out/log.txt"
    else
        timeout "$limit" "$@" 2>&1 | tee "$tmp/$name.log" >>"$out/log.txt"
    fi
    rc=${PIPESTATUS[0]}
    note "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))") in $((SECONDS - t0)) s"
    return "$rc"
}

step info 20 "$bin/minigpt4" info
grep -i "would be used" "$tmp/info.log" | tee -a "$summary"

filter=()
[ "$mode" = --tiny ] && filter=(rms_norm_fused)
step kernels 150 "$bin/kernels" --test-threads 4 "${filter[@]}"
grep -E "^test result|FAILED|panicked" "$tmp/kernels.log" | head -20 | tee -a "$summary"

answer=("$bin/minigpt4" chat --model tests/fixtures/minigpt4/vicuna0_tiny_pkg
    --image tests/fixtures/images/chelsea_q90.jpg --prompt 'What is in this picture?'
    --greedy --max-new-tokens 12 --format json)
tokens() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["token_ids"])' "$1" 2>/dev/null; }
MINIGPT4_PORTABLE=1 STDOUT="$out/tiny-portable.json" step tiny-portable 40 "${answer[@]}"
STDOUT="$out/tiny-default.json" step tiny-default 40 "${answer[@]}"
want=$(tokens "$kit/tiny-answer.json")
for v in portable default; do
    got=$(tokens "$out/tiny-$v.json")
    if [ -n "$got" ] && [ "$got" = "$want" ]; then
        note "tiny package, $v kernels: tokens equal to the software driver's"
    else
        note "tiny package, $v kernels: tokens DIFFER: $got against $want"
    fi
done

layers=()
runs=5
case "$mode" in
    --quick) layers=(--layers 4) runs=3 ;;
    --tiny) layers=(--tiny) runs=1 ;;
esac
STDOUT="$out/bench.json" step bench 200 "$bin/minigpt4" bench --runs "$runs" --synthetic vicuna0-7b "${layers[@]}" --json
python3 - "$out/bench.json" <<'EOF' | tee -a "$summary"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"bench: no JSON report ({e})")
    sys.exit()
print(f"bench: {r['adapter']} ({r['backend']}, {r['driver']}), kernels {r['kernel_variant']}, "
      f"timed by {r['kernel_clock']}, copy {r['copy']['gb_per_s']:.1f} GB/s")
d = r.get("dispatch", {})
print(f"dispatch of next to no work: {d.get('us_1_groups', 0):.1f} us with 1 workgroup, {d.get('us_16_groups', 0):.1f} us with 16")
g = r.get("gemv_lanes", {})
print("GEMV lanes:", ", ".join(f"{t['lanes']}: {t['gb_per_s']:.1f} GB/s" for t in g.get("trials", [])),
      f"-> {g.get('chosen')}; fuse_norm {g.get('fuse_norm', {}).get('chosen')}")
for t in r.get("gemv", []):
    print(f"GEMV {t['dtype']:>4} {t['n']}x{t['k']}: {t['gb_per_s']:.1f} GB/s = {t['percent_of_copy']:.0f} % of copy")
for t in r.get("attention", []):
    print(f"attention {t['model']} {t['heads']}/{t['kv_heads']}x{t['head_dim']} ctx {t['context']}"
          f"{' split-K' if t['split_k'] else ''}: {t['gb_per_s']:.1f} GB/s = {t['percent_of_copy']:.0f} % of copy, "
          f"{t['us_per_layer']:.1f} us per layer")
for t in r.get("sampling", []):
    print(f"sampling over {t['vocab']} logits: top-k {t['topk_us']:.0f} us, top-k + sample {t['topk_sample_us']:.0f} us")
f = r.get("gemm", {}).get("forms", {})
for name, shape in [("tuning shape", f.get("tune_shape")), ("tuning large shape", f.get("tune_shape_large"))] + [(s["case"], s) for s in f.get("at_shapes", [])]:
    if shape:
        print(f"GEMM forms at {name} {shape['m']}x{shape['n']}x{shape['k']} {shape['dtype']}:",
              ", ".join(f"{t['form']}: {t['gflop_per_s']:.1f}" for t in shape["trials"]), "GFLOP/s")
print(f"GEMM form chosen: {f.get('chosen')}, forms per shape: {f.get('by_shape')}")
for c in r.get("gemm", {}).get("cases", []):
    print(f"GEMM {c['case']} {c['m']}x{c['n']}x{c['k']} {c['dtype']} (form {c['form']}): {c['gflop_per_s']:.1f} GFLOP/s")
e = r.get("end_to_end")
if e:
    print(f"end to end ({e['llm_layers']} LLM / {e['vit_layers']} ViT layers): image encode {e['image_encode_ms']:.1f} ms, "
          f"prefill {e['prefill_tok_per_s']:.0f} tok/s, decode {e['decode_tok_per_s_ctx_short']:.1f} tok/s at "
          f"{e['ctx_short']} and {e['decode_tok_per_s_ctx_long']:.1f} at {e['ctx_long']}, first token "
          f"{e['time_to_first_token_s']:.3f} s, GPU memory {e['gpu_memory_bytes']['total'] / 1e9:.2f} GB")
for t in r.get("targets", []):
    met = {True: "met", False: "NOT met", None: "not judged"}[t["met"]]
    print(f"target: {t['target']}: {t['measured']:.1f}: {met}; {t['detail']}")
EOF
[ "$mode" = --tiny ] || layers=(--layers 4)
MINIGPT4_PROFILE=1 step profile 60 "$bin/minigpt4" bench --runs 1 --synthetic vicuna0-7b "${layers[@]}" --parts e2e,decode
# the image encode's kernels (ms/image), then the decode's (ms/token)
grep -E "ms/image" "$tmp/profile.log" | head -16 | tee -a "$summary"
grep -E "ms/token|^decode alone" "$tmp/profile.log" | tail -17 | tee -a "$summary"
# image encode and prefill (4 layers) with the GEMM's forms per shape (a fast device's
# default) and with the one tuned form
for shapes in 1 0; do
    MINIGPT4_GEMM_SHAPES=$shapes STDOUT="$tmp/shapes$shapes.json" step "gemm-shapes-$shapes" 30 \
        "$bin/minigpt4" bench --runs 3 --synthetic vicuna0-7b "${layers[@]}" --parts e2e --json
    python3 - "$tmp/shapes$shapes.json" "$shapes" <<'EOF' | tee -a "$summary"
import json, sys
try:
    e = json.load(open(sys.argv[1]))["end_to_end"]
    print(f"GEMM forms per shape {sys.argv[2]}: image encode {e['image_encode_ms']:.1f} ms "
          f"({e['vit_layers']} ViT layers), prefill {e['prefill_tok_per_s']:.0f} tok/s")
except Exception as err:
    print(f"GEMM forms per shape {sys.argv[2]}: no report ({err})")
EOF
done
note "done in $SECONDS s"
# a failed step or different tokens make the run fail (after everything has run)
! grep -qE "FAILED|DIFFER" "$summary"
