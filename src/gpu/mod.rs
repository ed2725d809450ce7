//! The GPU runtime: device context, tensors, kernels and the command recorder.

pub mod context;
pub mod ops;
pub mod recorder;
pub mod shader;
pub mod tensor;
pub mod tune;

pub use context::{adapter_reports, AdapterReport, Gpu, GpuOptions, Requirements};
pub use ops::{
    attention_partials, gemm_candidates, gemm_form_for, gemv_candidates, is_gemm_form,
    is_gemv_lanes, kv_cache_shape, kv_cache_views, rows_subgroup_fits, x_subgroup_fits, AttnShape,
    HeadView, MatmulPath, RopeKv, RopeMode, RopeTable, SampleParams, ATTN_SPLIT, ATTN_TILED_FROM,
    ATTN_TILE_DIM, ATTN_TILE_ROWS, GEMM_HALF, GEMM_ROWS, GEMM_SHORT, GEMM_TALL, GEMM_WIDE,
    GEMV_LANES, GEMV_SUBGROUP, GEMV_UNIFORM_X, GEMV_WG16, GEMV_X_SUBGROUP,
};
pub use recorder::{Plan, Recorder};
pub use shader::Variant;
pub use tensor::{stored_row_bytes, Ids, Tensor};
