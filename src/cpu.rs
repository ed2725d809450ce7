//! Plain CPU reference implementations of every kernel, written for clarity, in f64 where it
//! helps accuracy. The GPU kernels are tested against these.

/// `out[m, n] = Σ_k x[m, k] · w[n, k] + bias[n]`.
pub fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for l in 0..k {
                acc += x[i * k + l] as f64 * w[j * k + l] as f64;
            }
            out[i * n + j] = (acc + bias.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
    out
}

pub fn layer_norm(x: &[f32], cols: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for c in 0..cols {
            o[c] = ((row[c] as f64 - mean) * inv * w[c] as f64 + b[c] as f64) as f32;
        }
    }
    out
}

pub fn rms_norm(x: &[f32], cols: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for c in 0..cols {
            o[c] = (row[c] as f64 * inv * w[c] as f64) as f32;
        }
    }
    out
}

pub fn softmax(x: &[f32], cols: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
        let m = row
            .iter()
            .fold(f64::MIN, |a, &v| a.max(v as f64 * scale as f64));
        let e: Vec<f64> = row
            .iter()
            .map(|&v| (v as f64 * scale as f64 - m).exp())
            .collect();
        let s: f64 = e.iter().sum();
        for c in 0..cols {
            o[c] = (e[c] / s) as f32;
        }
    }
    out
}

/// erf in f64 to about 1e-15: Taylor series below 2.5, continued fraction for erfc above.
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 2.5 {
        let mut term = z;
        let mut sum = z;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -z * z / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() || n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(z) = exp(-z²)/√π · 1/(z + 1/2/(z + 1/(z + 3/2/(z + ...))))
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / f
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| (0.5 * v as f64 * (1.0 + erf(v as f64 / std::f64::consts::SQRT_2))) as f32)
        .collect()
}

pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
        .collect()
}

/// Rotary embedding on `[rows, heads, d]` (contiguous), positions `pos0..`, frequencies
/// `theta^(-2i/d)`; `interleaved` pairs (2i, 2i+1), otherwise (i, i+d/2).
pub fn rope(
    x: &[f32],
    heads: usize,
    d: usize,
    pos0: usize,
    theta: f32,
    interleaved: bool,
) -> Vec<f32> {
    let table = crate::gpu::RopeTable::values(d, pos0 + x.len() / (heads * d), theta);
    let half = d / 2;
    let mut out = x.to_vec();
    for (t, row) in out.chunks_mut(heads * d).enumerate() {
        for h in 0..heads {
            for i in 0..half {
                let tb = ((pos0 + t) * half + i) * 2;
                let (c, s) = (table[tb], table[tb + 1]);
                let (a, b) = if interleaved {
                    (h * d + 2 * i, h * d + 2 * i + 1)
                } else {
                    (h * d + i, h * d + i + half)
                };
                let (x0, x1) = (row[a], row[b]);
                row[a] = x0 * c - x1 * s;
                row[b] = x1 * c + x0 * s;
            }
        }
    }
    out
}

/// Attention on contiguous `q[t, hq, d]`, `k[s, hkv, d]`, `v[s, hkv, d]` → `[t, hq, d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; t * hq * d];
    let group = hq / hkv;
    for i in 0..t {
        let visible = if causal { (i + s - t + 1).min(s) } else { s };
        for h in 0..hq {
            let kh = h / group;
            let qrow = &q[(i * hq + h) * d..][..d];
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let krow = &k[(j * hkv + kh) * d..][..d];
                    qrow.iter()
                        .zip(krow)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                let mut acc = 0f64;
                for (j, &p) in e.iter().enumerate() {
                    acc += p * v[(j * hkv + kh) * d + c] as f64;
                }
                out[(i * hq + h) * d + c] = (acc / sum) as f32;
            }
        }
    }
    out
}

pub fn embedding(ids: &[u32], table: &[f32], cols: usize) -> Vec<f32> {
    ids.iter()
        .flat_map(|&i| table[i as usize * cols..][..cols].iter().copied())
        .collect()
}

/// `[C, H, W]` → `[(H/p)(W/p), C·p·p]` patches.
pub fn im2col(img: &[f32], c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (gh, gw) = (h / p, w / p);
    let mut out = Vec::with_capacity(gh * gw * c * p * p);
    for py in 0..gh {
        for px in 0..gw {
            for ch in 0..c {
                for ky in 0..p {
                    for kx in 0..p {
                        out.push(img[(ch * h + py * p + ky) * w + px * p + kx]);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn erf_matches_known_values() {
        for (x, e) in [
            (0.0, 0.0),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
            (-1.5, -0.9661051464753108),
        ] {
            assert!((super::erf(x) - e).abs() < 1e-13, "{x}");
        }
    }
}
