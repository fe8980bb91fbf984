//! f32 CPU kernels: contiguous f32 tensors in, a new tensor out; each parallelised with rayon and gemm.

pub mod attention;
pub mod conv;
pub mod ops;

use candle_core::{CpuStorage, Result, Storage, Tensor};

/// The values of a contiguous f32 CPU tensor, borrowed from its storage guard.
pub(crate) fn values<'a>(storage: &'a Storage, t: &Tensor) -> Result<&'a [f32]> {
    let start = t.layout().start_offset();
    match storage {
        Storage::Cpu(CpuStorage::F32(data)) if t.is_contiguous() => Ok(&data[start..start + t.elem_count()]),
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor"),
    }
}

/// gemm's threading: rayon's pool when it has more than one thread.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}
