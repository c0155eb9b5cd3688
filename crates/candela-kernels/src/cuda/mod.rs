//! CUDA side of candela-kernels' ops: launchers for the kernels in `kernels/*.cu`.
//!
//! `build.rs` compiles each `.cu` file to PTX; the PTX is embedded here and loaded through
//! candle's `CudaDevice::get_or_load_custom_func`, which caches the module per device, so the
//! driver JIT-compiles each module once per process. Every launcher checks the layouts it
//! relies on and `bail!`s with what it expected, as the CPU side does; shapes and dtypes were
//! already checked (device independently) by the public functions that build the ops.
//!
//! In `candela-kernels` a CUDA thread block is called a *cta*: "block" means a KV-cache block.

pub(crate) mod attention;
pub(crate) mod fused;
pub(crate) mod norm;
pub mod quant;

pub use quant::CudaPackedWeight;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaView, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

/// PTX of `kernels/paged_attention.cu` (module name, source).
pub(crate) const PAGED_ATTENTION_PTX: (&str, &str) = (
    "candela_paged_attention",
    include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx")),
);

/// PTX of `kernels/fused.cu` (module name, source).
pub(crate) const FUSED_PTX: (&str, &str) = (
    "candela_fused",
    include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")),
);

/// PTX of `kernels/norm.cu` (module name, source).
pub(crate) const NORM_PTX: (&str, &str) = (
    "candela_norm",
    include_str!(concat!(env!("OUT_DIR"), "/norm.ptx")),
);

/// An element type the kernels are instantiated for, and its suffix in kernel names.
pub(crate) trait KernelDType: DeviceRepr + ValidAsZeroBits + CudaDType + Copy {
    /// `f32`, `f16` or `bf16`, as in `paged_attention_f16_128`.
    const SUFFIX: &'static str;
}

impl KernelDType for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelDType for f16 {
    const SUFFIX: &'static str = "f16";
}
impl KernelDType for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// `(free, total)` bytes of the CUDA device `device` is on, as the driver reports them
/// (`cuMemGetInfo`): the engine sizes its KV cache from this after loading the weights.
/// Memory held by candle's allocator counts as used. `Err` for a non-CUDA device.
pub fn memory_info(device: &candle_core::Device) -> Result<(usize, usize)> {
    use candle_core::cuda_backend::WrapErr;
    match device {
        candle_core::Device::Cuda(dev) => {
            device.synchronize()?;
            dev.cuda_stream().context().mem_get_info().w()
        }
        other => candle_core::bail!(
            "memory_info needs a CUDA device, got {:?}",
            other.location()
        ),
    }
}

/// Opens CUDA device `ordinal` as the engine uses it: candle's device with cudarc's event
/// tracking off. With tracking on (cudarc's default) every allocation creates a read and a
/// write CUDA event and every free destroys them, four driver calls around each of the
/// hundreds of small tensors a decode step allocates; the events only order work across
/// streams, and candle issues all of it on one stream, which never puts the context in
/// cudarc's multi-stream mode, so they are created and never waited on.
pub fn open_device(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    if let candle_core::Device::Cuda(dev) = &device {
        // SAFETY: candle launches, copies and frees on the device's one stream, so stream
        // order alone keeps every use before its free; no second stream is ever created.
        unsafe { dev.disable_event_tracking() };
    }
    Ok(device)
}

/// Loads (once per device and module) and returns a kernel; launch it on
/// `dev.cuda_stream()`, candle's stream, so it is ordered with candle's own work.
pub(crate) fn kernel(dev: &CudaDevice, module: (&str, &str), name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module.0, module.1)?
        .into_cuda_function())
}

/// Raises a kernel's dynamic shared-memory limit when it needs more than the default 48 KiB.
pub(crate) fn allow_shared_bytes(func: &CudaFunction, bytes: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::WrapErr;
    if bytes > 48 * 1024 {
        let bytes = i32::try_from(bytes)
            .map_err(|_| candle_core::Error::Msg(format!("shared memory {bytes} B too large")))?;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes,
        )
        .w()?;
    }
    Ok(())
}

/// The contiguous elements a layout covers, as a view of the storage's slice.
pub(crate) fn contiguous_view<'a, T: DeviceRepr + CudaDType>(
    op: &str,
    tensor: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!(
            "{op}: `{tensor}` must be contiguous, got shape {:?} strides {:?}",
            layout.dims(),
            layout.stride()
        ),
    }
}

/// A `u32` metadata tensor's storage, held (read-locked) while a launch uses it.
pub(crate) struct MetaGuard<'a, G> {
    storage: G,
    layout: &'a Layout,
    tensor: &'static str,
}

/// Read-locks a `u32` metadata tensor's storage.
pub(crate) fn meta_guard<'a>(
    tensor: &'static str,
    t: &'a Tensor,
) -> Result<MetaGuard<'a, impl std::ops::Deref<Target = Storage> + 'a>> {
    if t.dtype() != DType::U32 {
        candle_core::bail!("`{tensor}` must be u32, got {:?}", t.dtype());
    }
    let (storage, layout) = t.storage_and_layout();
    Ok(MetaGuard {
        storage,
        layout,
        tensor,
    })
}

impl<G: std::ops::Deref<Target = Storage>> MetaGuard<'_, G> {
    pub(crate) fn view(&self, op: &str) -> Result<CudaView<'_, u32>> {
        match &*self.storage {
            Storage::Cuda(s) => match self.layout.contiguous_offsets() {
                Some((start, end)) => Ok(s.as_cuda_slice::<u32>()?.slice(start..end)),
                None => candle_core::bail!("{op}: `{}` must be contiguous", self.tensor),
            },
            _ => candle_core::bail!(
                "{op}: `{}` must be on the CUDA device like `q`",
                self.tensor
            ),
        }
    }
}

/// A launch dimension as the `u32` CUDA wants, or an error naming it.
pub(crate) fn dim_u32(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} = {v} exceeds u32")))
}

/// A scalar kernel argument as `i32`, or an error naming it.
pub(crate) fn arg_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} = {v} exceeds i32")))
}

/// A scalar kernel argument as `i64` (row strides, element counts), or an error naming it.
pub(crate) fn arg_i64(op: &str, what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} = {v} exceeds i64")))
}
