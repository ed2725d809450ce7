// Weight storage formats (see src/quant.rs for the byte layout). Exactly one W_* flag is set.
// Declares binding 2 (`w`, the data words) and, for quantised formats, binding 3 (`w_scales`),
// `w_at(i)`: element i (row-major within the tensor part) as f32, and `w4_at(i)`: elements
// i .. i + 3 (i a multiple of 4) with one data load and at most one scale load.

#if W_F32
// Four elements per 16-byte load (why: see W_F16 below).
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;

fn w_at(i: u32) -> f32 {
    return w[i >> 2u][i & 3u];
}

fn w4_at(i: u32) -> vec4<f32> {
    return w[i >> 2u];
}
#endif

#if W_F16
// Eight elements per 16-byte load, unpacked to f32 (also in the f16 variants: the kernels
// compute in f32 or convert to f16 themselves): memory-bound kernels are bound by the number
// of loads on CPU drivers (each is a gather across the SIMD lanes), and wide loads are what
// GPUs coalesce best.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

fn w_at(i: u32) -> f32 {
    return unpack2x16float(w[i >> 3u][(i >> 1u) & 3u])[i & 1u];
}

fn w4_at(i: u32) -> vec4<f32> {
    let v = w[i >> 3u];
    let h = select(v.xy, v.zw, (i & 4u) != 0u);
    return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y));
}
#endif

#if W_Q8
// Two elements per 32-weight block (16-byte loads: memory-bound kernels are bound by the
// number of loads on CPU drivers, and wide loads are what GPUs coalesce best).
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> w_scales: array<u32>;

fn scale_at(b: u32) -> f32 {
    return unpack2x16float(w_scales[b >> 1u])[b & 1u];
}

fn w_at(i: u32) -> f32 {
    let q = extractBits(bitcast<i32>(w[i >> 4u][(i >> 2u) & 3u]), (i & 3u) * 8u, 8u);
    return f32(q) * scale_at(i >> 5u);
}

fn w4_at(i: u32) -> vec4<f32> {
    let v = vec4<i32>(bitcast<i32>(w[i >> 4u][(i >> 2u) & 3u]));
    let q = (v << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
    return vec4<f32>(q) * scale_at(i >> 5u);
}
#endif

#if W_Q4
// One element per 32-weight block (one 16-byte load per block).
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> w_scales: array<u32>;

fn scale_at(b: u32) -> f32 {
    return unpack2x16float(w_scales[b >> 1u])[b & 1u];
}

fn w_at(i: u32) -> f32 {
    return (nibble(i) - 8.0) * scale_at(i >> 5u);
}

fn w4_at(i: u32) -> vec4<f32> {
    return (nibbles4(i) - 8.0) * scale_at(i >> 5u);
}
#endif

#if W_Q4M
// One element per 32-weight block, as for q4.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> w_scales: array<u32>;

// One word per block: f16 scale d (low half), f16 minimum m (high half); w = q * d + m.
fn w_at(i: u32) -> f32 {
    let dm = unpack2x16float(w_scales[i >> 5u]);
    return nibble(i) * dm.x + dm.y;
}

fn w4_at(i: u32) -> vec4<f32> {
    let dm = unpack2x16float(w_scales[i >> 5u]);
    return nibbles4(i) * dm.x + dm.y;
}
#endif

#if W_Q4 || W_Q4M
// The 4-bit value q of element i (eight per word, four words per block).
fn nibble(i: u32) -> f32 {
    return f32(extractBits(w[i >> 5u][(i >> 3u) & 3u], (i & 7u) * 4u, 4u));
}

// q of elements i .. i + 3 (i a multiple of 4): one word, one load.
fn nibbles4(i: u32) -> vec4<f32> {
    let word = w[i >> 5u][(i >> 3u) & 3u] >> ((i & 4u) * 4u);
    return vec4<f32>((vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
}
#endif
