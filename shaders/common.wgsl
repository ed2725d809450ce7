// Shared by every kernel family (pulled in with `#include common`).
//
// WG is the workgroup size of the row-reduction kernels (matmul GEMV, norms, softmax,
// attention). Element-wise kernels use 256 invocations, the portable maximum.

const WG: u32 = 64u;
const NEG_BIG: f32 = -3.0e38;

// Per-invocation ids. Kept apart from `Grp` because WGSL's uniformity analysis judges a struct
// parameter as a whole: had it carried the invocation index, every value derived from the
// workgroup id would count as non-uniform, and an early `return` of a whole workgroup before a
// barrier would be rejected (browsers enforce this; naga does not).
struct Ids {
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUPS
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
#endif
}

// Per-workgroup ids (uniform across the workgroup).
struct Grp {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
}

// Linear workgroup index of a grid spread over x and y (see `recorder::grid`).
fn group_index(g: Grp) -> u32 {
    return g.wg.x + g.wg.y * g.nwg.x;
}

// Linear invocation index for the 256-wide element-wise kernels.
fn flat_index(g: Grp, ids: Ids) -> u32 {
    return group_index(g) * 256u + ids.lid;
}

// What the workgroup reductions reduce: one f32, or (HEADS2, HEADS3, HEADS4: attention over
// several query heads at once) a vector of them, reduced component by component.
#if HEADS2 || HEADS3 || HEADS4
#if HEADS2
alias RED = vec2<f32>;
#endif
#if HEADS3
alias RED = vec3<f32>;
#endif
#if HEADS4
alias RED = vec4<f32>;
#endif
#else
alias RED = f32;
#endif

var<workgroup> red: array<RED, WG>;

// Sum of `v` over the WG invocations of the workgroup; every invocation gets the total.
// Must be called in uniform control flow by all WG invocations.
fn wg_sum(v: RED, ids: Ids) -> RED {
#if SUBGROUPS
    let s = subgroupAdd(v);
    workgroupBarrier();
    red[ids.lid] = select(RED(0.0), s, ids.sg_lane == 0u);
    workgroupBarrier();
    // Each subgroup sums every slot once, whatever the subgroup-to-invocation mapping.
    var t = RED(0.0);
    for (var j = ids.sg_lane; j < WG; j += ids.sg_size) {
        t += red[j];
    }
    return subgroupAdd(t);
#else
    workgroupBarrier();
    red[ids.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (ids.lid < s) {
            red[ids.lid] += red[ids.lid + s];
        }
        workgroupBarrier();
    }
    return red[0];
#endif
}

// Maximum of `v` over the workgroup; same contract as wg_sum.
fn wg_max(v: RED, ids: Ids) -> RED {
#if SUBGROUPS
    let s = subgroupMax(v);
    workgroupBarrier();
    red[ids.lid] = select(RED(NEG_BIG), s, ids.sg_lane == 0u);
    workgroupBarrier();
    var t = RED(NEG_BIG);
    for (var j = ids.sg_lane; j < WG; j += ids.sg_size) {
        t = max(t, red[j]);
    }
    return subgroupMax(t);
#else
    workgroupBarrier();
    red[ids.lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (ids.lid < s) {
            red[ids.lid] = max(red[ids.lid], red[ids.lid + s]);
        }
        workgroupBarrier();
    }
    return red[0];
#endif
}
