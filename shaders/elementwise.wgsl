// Element-wise kernels, in place on x, 256 invocations per workgroup, one element each.
//   add:      x[i] += y[i]                  (residual)
//   add_bias: x[i] += y[i % cols]           (bias broadcast over rows)
//   gelu:     x = 0.5 x (1 + erf(x / sqrt 2)) (exact GELU, as nn.GELU())
//   silu_mul: x = x * sigmoid(x) * y[i]     (LLaMA gate * up)
//   scale:    x *= s

#include common

struct Params {
    n: u32,
    cols: u32,
    s: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;

// erf with |error| < 1.2e-7 everywhere (Chebyshev fit of erfc, Numerical Recipes' erfcc form).
fn erf_f32(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let r = 1.0 - t * exp(poly);
    return select(r, -r, v < 0.0);
}

@compute @workgroup_size(256)
fn add(ids: Ids, grp: Grp) {
    let i = flat_index(grp, ids);
    if (i < p.n) {
        x[i] += y[i];
    }
}

@compute @workgroup_size(256)
fn add_bias(ids: Ids, grp: Grp) {
    let i = flat_index(grp, ids);
    if (i < p.n) {
        x[i] += y[i % p.cols];
    }
}

@compute @workgroup_size(256)
fn gelu(ids: Ids, grp: Grp) {
    let i = flat_index(grp, ids);
    if (i < p.n) {
        let v = x[i];
        x[i] = 0.5 * v * (1.0 + erf_f32(v * 0.70710678118654752));
    }
}

@compute @workgroup_size(256)
fn silu_mul(ids: Ids, grp: Grp) {
    let i = flat_index(grp, ids);
    if (i < p.n) {
        let v = x[i];
        x[i] = v / (1.0 + exp(-v)) * y[i];
    }
}

@compute @workgroup_size(256)
fn scale(ids: Ids, grp: Grp) {
    let i = flat_index(grp, ids);
    if (i < p.n) {
        x[i] *= p.s;
    }
}
