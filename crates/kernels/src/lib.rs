//! kiln-kernels: operations written as kernels for Burn's `flex` CPU backend, where Burn's
//! general operations leave time on the table. Every kernel has a path through Burn's own
//! operations that every other backend (ndarray, tch, wgpu, cuda) takes, and a unit test that
//! the two agree — values and gradients.
//!
//! - [`ops`]: what any family may use — the Adam step in one pass, binary cross-entropy from
//!   logits summed per row, and the helpers to write more (`on_flex_f32`, `f32s`, `contiguous`).
//! - [`conv`]: the CNN's convolution (im2col into one product), and the fused
//!   batch-norm → ReLU → max-pool tail of a convolution block.
//! - [`strided`]: convolutions and transposed convolutions of any stride (im2col or col2im
//!   around one product per cache-sized chunk of the batch, forward and backward): the DCGAN's,
//!   the autoencoder's, ResNet's down-sampling ones, and the CNN's forward pass and ∂x.
//! - [`batchnorm`]: batch normalisation of `[N, C, H, W]` in one pass each way.
//! - [`activation`]: GELU in one pass each way (a vectorised erf), LeakyReLU, tanh.
//! - [`attention`]: causal scaled-dot-product attention, the softmax fused between the two
//!   products, only the attention weights kept for the backward pass.
//! - [`linear`]: a dense layer, X·W + b, each product written straight into its tensor (no
//!   realigning copy), the bias added in place, each gradient one product over all rows.
//! - [`norm`]: layer normalisation in one pass each way.
//! - `packed`: matrix products on kiln's own AVX-512 register kernel (the `gemm` crate
//!   elsewhere): a right-hand side packed once for many calls (a recurrence's h_{t−1}·W_h at
//!   every step), and a blocked product for a recurrent layer's products over all steps.
//! - [`recurrent`]: a whole LSTM or GRU layer over a sequence (the input projection of all
//!   steps as one product, only h_{t−1}·W_h inside the loop, the gates fused, the weight
//!   gradients as one product after it).
//!
//! The next family's kernels go here too, beside these, so that they can be found and reused.

/// `fn name(args) -> ret => body` defines `name`, which runs the `#[inline(always)]` function
/// `body` compiled for AVX-512 or for AVX2 when the processor has them (chosen at run time;
/// kiln is compiled for baseline x86-64), else as compiled.
macro_rules! widest_simd {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the processor has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the processor has AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod activation;
pub mod attention;
pub mod batchnorm;
pub mod conv;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod ops;
mod packed;
pub mod recurrent;
pub mod strided;

/// A tensor's values as `f32` (tests).
#[cfg(test)]
pub(crate) fn to_vec<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

/// Asserts that a and b agree to `tol`, relatively beyond 1 (tests).
#[cfg(test)]
pub(crate) fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        assert!(
            (p - q).abs() <= tol * (1.0 + q.abs()),
            "{what}[{i}]: {p} vs {q}"
        );
    }
}
