//! Layer normalisation as one flex operation, forward and backward.
//!
//! For each row x of d features, with γ and β learned per feature:
//!
//! ```text
//! μ = Σ_j x_j / d,   σ² = Σ_j (x_j − μ)² / d,   r = 1/√(σ² + ε)
//! x̂_j = (x_j − μ)·r,   y_j = γ_j·x̂_j + β_j
//! ```
//!
//! and backward, with g = ∂L/∂y:
//!
//! ```text
//! ∂L/∂β_j = Σ_rows g_j,   ∂L/∂γ_j = Σ_rows g_j·x̂_j
//! ∂L/∂x_j = r·(γ_j g_j − mean_k(γ_k g_k) − x̂_j·mean_k(γ_k g_k x̂_k))
//! ```
//!
//! Burn's `layer_norm` under autodiff is a chain of eight operations (mean, subtraction,
//! square, mean, square root, division, scale, shift), each a full `[rows, d]` tensor forward
//! and again backward. Here each direction is one pass over the rows (rows shared among
//! threads), keeping only μ and r per row. Other backends take Burn's `layer_norm`; a unit
//! test compares the two, values and gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::LayerNorm;
use burn::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::ops::{contiguous, f32s, on_flex_f32, tensor, written_in_full};

/// The ε of `LayerNormConfig`'s default (1e-5), which the kiln networks that call
/// [`layer_norm`] keep (Burn's `LayerNorm` does not expose its own).
pub const EPSILON: f64 = 1e-5;

#[backend_extension(Flex, Autodiff)]
pub trait NormOps: Backend {
    /// `[rows, d]` x, `[d]` γ and β → `[rows, d]`: (x − μ)/√(σ² + ε)·γ + β per row.
    fn layer_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
}

/// `norm.forward(x)` for a `LayerNorm` with β and ε = [`EPSILON`]: on flex (f32) one fused
/// operation each way, elsewhere Burn's own.
pub fn layer_norm<const D: usize>(x: Tensor<D>, norm: &LayerNorm) -> Tensor<D> {
    let (gamma, Some(beta)) = (norm.gamma.val(), norm.beta.as_ref().map(|b| b.val())) else {
        return norm.forward(x);
    };
    if !(on_flex_f32(&x) && on_flex_f32(&gamma)) {
        return norm.forward(x);
    }
    let shape = x.shape();
    let d = shape[D - 1];
    let rows: Tensor<2> = x.reshape([shape.num_elements() / d.max(1), d]);
    let y: Tensor<2> = Tensor::from_dispatch(<Dispatch as NormOps>::layer_norm_rows(
        rows.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        EPSILON,
    ));
    y.reshape(shape)
}

/// Rows per thread's task.
const ROWS: usize = 64;

/// Partial sums a row's reductions keep side by side (one AVX-512 register).
const LANES: usize = 16;

/// Σ f(v) over v in x, in [`LANES`] lanes so that it vectorises.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += f(chunk[l]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// y = (x − μ)·r·γ + β for one row; returns (μ, r).
#[inline(always)]
fn row_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = lane_sum(x, |v| v) / d;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d;
    let r = 1.0 / (var + eps).sqrt();
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        y.write((x - mean) * r * g + b);
    }
    (mean, r)
}

#[inline(always)]
fn forward_loop(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [MaybeUninit<f32>],
    stats: &mut [f32],
) {
    let d = gamma.len();
    for ((x, y), s) in x
        .chunks_exact(d)
        .zip(y.chunks_exact_mut(d))
        .zip(stats.chunks_exact_mut(2))
    {
        let (mean, r) = row_forward(x, gamma, beta, eps, y);
        s[0] = mean;
        s[1] = r;
    }
}

/// ∂L/∂x for a block of rows, and its rows' sums Σ g and Σ g·x̂ added into `dbeta`, `dgamma`.
#[inline(always)]
fn backward_loop(
    x: &[f32],
    g: &[f32],
    gamma: &[f32],
    stats: &[f32],
    dx: &mut [MaybeUninit<f32>],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let d = gamma.len();
    let inv_d = 1.0 / d as f32;
    let rows = x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d));
    for (((x, g), dx), s) in rows.zip(stats.chunks_exact(2)) {
        let (mean, r) = (s[0], s[1]);
        // a = Σ g·γ and c = Σ g·γ·x̂ in LANES lanes (so that the loop vectorises).
        let (mut a, mut c) = ([0.0f32; LANES], [0.0f32; LANES]);
        let full = d / LANES * LANES;
        for base in (0..full).step_by(LANES) {
            for l in 0..LANES {
                let j = base + l;
                let xhat = (x[j] - mean) * r;
                let gy = g[j] * gamma[j];
                a[l] += gy;
                c[l] += gy * xhat;
                dgamma[j] += g[j] * xhat;
                dbeta[j] += g[j];
            }
        }
        for j in full..d {
            let xhat = (x[j] - mean) * r;
            let gy = g[j] * gamma[j];
            a[0] += gy;
            c[0] += gy * xhat;
            dgamma[j] += g[j] * xhat;
            dbeta[j] += g[j];
        }
        let (a, c) = (a.iter().sum::<f32>() * inv_d, c.iter().sum::<f32>() * inv_d);
        for j in 0..d {
            let xhat = (x[j] - mean) * r;
            dx[j].write(r * (g[j] * gamma[j] - a - xhat * c));
        }
    }
}

widest_simd! {
    /// [`forward_loop`] in the widest vector instructions the processor has.
    fn forward_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [MaybeUninit<f32>], stats: &mut [f32]) => forward_loop
}

widest_simd! {
    /// [`backward_loop`] in the widest vector instructions the processor has.
    fn backward_rows(x: &[f32], g: &[f32], gamma: &[f32], stats: &[f32], dx: &mut [MaybeUninit<f32>], dgamma: &mut [f32], dbeta: &mut [f32]) => backward_loop
}

/// y `[rows, d]` and (μ, r) per row; y written without a zero fill first.
fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let n = x.len() / d.max(1);
    let mut stats = vec![0.0f32; 2 * n];
    let blocks = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut((ROWS * d).max(1))
            .zip(stats.par_chunks_mut(2 * ROWS))
            .enumerate()
            .for_each(|(i, (y, s))| {
                let x = &x[i * ROWS * d..][..y.len()];
                forward_rows(x, gamma, beta, eps, y, s);
            })
    };
    // SAFETY: `forward_rows` writes every value of each row it is given, and the chunks
    // cover all n rows.
    let y = unsafe { written_in_full(n * d, blocks) };
    (y, stats)
}

/// ∂L/∂x (written without a zero fill first), ∂L/∂γ, ∂L/∂β.
fn backward(x: &[f32], g: &[f32], gamma: &[f32], stats: &[f32]) -> [Vec<f32>; 3] {
    let d = gamma.len();
    let mut partial: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let blocks = |dx: &mut [MaybeUninit<f32>]| {
        partial = dx
            .par_chunks_mut((ROWS * d).max(1))
            .enumerate()
            .map(|(i, dx)| {
                let span = i * ROWS * d..i * ROWS * d + dx.len();
                let s = &stats[2 * i * ROWS..][..2 * (dx.len() / d)];
                let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
                backward_rows(
                    &x[span.clone()],
                    &g[span],
                    gamma,
                    s,
                    dx,
                    &mut dgamma,
                    &mut dbeta,
                );
                (dgamma, dbeta)
            })
            .collect()
    };
    // SAFETY: `backward_rows` writes every value of each row it is given, and the chunks
    // cover all rows.
    let dx = unsafe { written_in_full(x.len(), blocks) };
    let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pg, pb) in partial {
        dgamma.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
        dbeta.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    [dx, dgamma, dbeta]
}

impl NormOps for Flex {
    fn layer_norm_rows(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        let shape = x.layout().shape().to_vec();
        let [x, gamma, beta] = [&x, &gamma, &beta].map(contiguous);
        let (y, _) = forward(f32s(&x), f32s(&gamma), f32s(&beta), epsilon as f32);
        tensor(y, shape)
    }
}

impl<C: CheckpointStrategy> NormOps for Autodiff<Flex, C> {
    fn layer_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl Backward<Flex, 3> for LayerNormBackward {
            // x, γ (contiguous), (μ, r) per row
            type State = ([FlexTensor; 2], Vec<f32>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let ([x, gamma], stats) = &ops.state;
                let shapes = [
                    x.layout().shape().to_vec(),
                    vec![gamma.layout().num_elements()],
                ];
                let g = backward(f32s(x), f32s(&grad), f32s(gamma), stats);
                let shapes = [shapes[0].clone(), shapes[1].clone(), shapes[1].clone()];
                for ((node, value), shape) in ops.parents.into_iter().zip(g).zip(shapes) {
                    if let Some(node) = node {
                        grads.register::<Flex>(node.id, tensor(value, shape));
                    }
                }
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let [x, gamma, beta] = [x, gamma, beta].map(|t| t.into_primitive());
        match LayerNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let shape = x.layout().shape().to_vec();
                let [x, gamma, beta] = [&x, &gamma, &beta].map(contiguous);
                let (y, stats) = forward(f32s(&x), f32s(&gamma), f32s(&beta), epsilon as f32);
                prep.finish(([x, gamma], stats), tensor(y, shape))
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::layer_norm_rows(x, gamma, beta, epsilon)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution};

    /// The fused layer norm against Burn's `LayerNorm`: values and the gradients of x, γ and β,
    /// for rows of the Transformer's width (128) in a 3-d batch spanning several threads' tasks,
    /// an odd width, and a single row; γ and β away from their 1 and 0.
    #[test]
    fn layer_norm_kernel_matches_burns() {
        let dev = Device::flex().autodiff();
        dev.seed(9);
        for shape in [[3, 70, 128], [2, 5, 37], [1, 1, 16]] {
            let d = shape[2];
            let mut norm = LayerNormConfig::new(d).init(&dev);
            let rand = |lo, hi| Tensor::<1>::random([d], Distribution::Uniform(lo, hi), &dev);
            norm.gamma = Param::from_tensor(rand(0.5, 1.5));
            norm.beta = Some(Param::from_tensor(rand(-0.5, 0.5)));
            let x0 = Tensor::<3>::random(shape, Distribution::Normal(0.3, 2.0), &dev);
            let weight = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
            let run = |fused: bool| {
                let x = x0.clone().detach().require_grad();
                let y = if fused {
                    layer_norm(x.clone(), &norm)
                } else {
                    norm.forward(x.clone())
                };
                let grads = (y.clone() * weight.clone()).sum().backward();
                let beta = norm.beta.as_ref().unwrap().val();
                let g = [
                    to_vec(x.grad(&grads).unwrap()),
                    to_vec(norm.gamma.val().grad(&grads).unwrap()),
                    to_vec(beta.grad(&grads).unwrap()),
                ];
                (to_vec(y), g)
            };
            let (y, g) = run(true);
            let (want, want_g) = run(false);
            for (what, (a, b)) in ["y", "∂x", "∂γ", "∂β"]
                .iter()
                .zip([(&y, &want)].into_iter().chain(g.iter().zip(&want_g)))
            {
                assert_eq!(a.len(), b.len());
                for (p, q) in a.iter().zip(b) {
                    assert!(
                        (p - q).abs() <= 2e-5 * q.abs().max(1.0),
                        "{what} {shape:?}: {p} vs {q}"
                    );
                }
            }
        }
    }
}
