//! kiln-kernels: operations written as kernels for Burn's `flex` CPU backend, where Burn's
//! general operations leave time on the table. Every kernel has a path through Burn's own
//! operations that every other backend (ndarray, tch, wgpu, cuda) takes, and a unit test that
//! the two agree — values and gradients.
//!
//! - [`ops`]: what any family may use — the Adam step in one pass, binary cross-entropy from
//!   logits summed per row, and the helpers to write more (`on_flex_f32`, `f32s`, `contiguous`).
//! - [`conv`]: the CNN's convolution (im2col into one product), and the fused
//!   batch-norm → ReLU → max-pool tail of a convolution block.
//!
//! The next family's kernels go here too, beside these, so that they can be found and reused.

pub mod conv;
pub mod ops;

/// A tensor's values as `f32` (tests).
#[cfg(test)]
pub(crate) fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}
