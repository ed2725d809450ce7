//! The GPU runtime: device context, tensors, kernels and the command recorder.

pub mod context;
pub mod ops;
pub mod recorder;
pub mod shader;
pub mod tensor;
pub mod tune;

pub use context::{adapter_reports, AdapterReport, Gpu, GpuOptions, Requirements};
pub use ops::{AttnShape, HeadView, MatmulPath, RopeMode, RopeTable, GEMV_LANES};
pub use recorder::Recorder;
pub use shader::Variant;
pub use tensor::{stored_row_bytes, Ids, Tensor};
