//! Typed errors of the kernels' argument checks.
//!
//! The public ops return `candle_core::Result` (they are candle ops and compose with candle's
//! `?`), so a [`KernelError`] crosses that boundary as `candle_core::Error::Wrapped`; its
//! `Display` text always names the op, the tensor, what was expected and what was got, so a
//! failing model call says exactly which argument was wrong. Inside the crate the checks return
//! `KernelError`, which lets the unit tests match on the variant.

use candle_core::DType;

/// A bad argument to one of the kernels' ops. Every variant names the op (`op`) and the tensor
/// or parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A tensor has the wrong number of dimensions.
    #[error("{op}: `{tensor}` must have rank {expected}, got rank {got} (shape {shape:?})")]
    Rank {
        /// The op that rejected the argument.
        op: &'static str,
        /// The argument's name.
        tensor: &'static str,
        /// The rank the op needs.
        expected: usize,
        /// The argument's rank.
        got: usize,
        /// The argument's full shape, for context.
        shape: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    #[error("{op}: `{tensor}` must have dtype {expected}, got {got:?}")]
    DType {
        /// The op that rejected the argument.
        op: &'static str,
        /// The argument's name.
        tensor: &'static str,
        /// The dtype (or dtypes) the op accepts.
        expected: String,
        /// The argument's dtype.
        got: DType,
    },
    /// A tensor's shape does not fit the other arguments.
    #[error("{op}: `{tensor}` must have shape {expected}, got {got:?}")]
    Shape {
        /// The op that rejected the argument.
        op: &'static str,
        /// The argument's name.
        tensor: &'static str,
        /// The expected shape, in words or numbers.
        expected: String,
        /// The argument's shape.
        got: Vec<usize>,
    },
    /// A tensor's memory layout is one the op cannot read in place.
    #[error("{op}: `{tensor}` must be {expected}, got shape {shape:?} with strides {stride:?} (offset {offset})")]
    Layout {
        /// The op that rejected the argument.
        op: &'static str,
        /// The argument's name.
        tensor: &'static str,
        /// The layout the op needs.
        expected: &'static str,
        /// The argument's shape.
        shape: Vec<usize>,
        /// The argument's strides, in elements.
        stride: Vec<usize>,
        /// The argument's start offset, in elements.
        offset: usize,
    },
    /// Arguments live on different devices.
    #[error("{op}: `{tensor}` is on {got}, expected {expected} like the other arguments")]
    Device {
        /// The op that rejected the argument.
        op: &'static str,
        /// The argument's name.
        tensor: &'static str,
        /// The device of the op's first argument.
        expected: String,
        /// The argument's device.
        got: String,
    },
    /// A value inside an index or metadata tensor is out of its allowed range.
    #[error("{op}: {tensor}[{index}] = {value} is out of range: {expected}")]
    OutOfRange {
        /// The op that rejected the argument.
        op: &'static str,
        /// The metadata tensor holding the bad value.
        tensor: &'static str,
        /// The position of the bad value in that tensor (row-major).
        index: usize,
        /// The bad value.
        value: u64,
        /// The rule it breaks, with the limit.
        expected: String,
    },
    /// A scalar parameter (not a tensor) is invalid.
    #[error("{op}: parameter `{param}` {expected}, got {got}")]
    Param {
        /// The op or constructor that rejected the parameter.
        op: &'static str,
        /// The parameter's name.
        param: &'static str,
        /// The rule it breaks.
        expected: String,
        /// The parameter's value.
        got: String,
    },
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}
