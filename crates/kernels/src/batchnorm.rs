//! Batch normalisation of `[N, C, H, W]` as one flex operation each way (a Burn backend
//! extension, `#[backend_extension(Flex, Autodiff)]`), with Burn's `BatchNorm` semantics: batch
//! statistics and a running-average update while training on an autodiff device, the running
//! averages otherwise. Per channel c, over the M = N·H·W values of the batch:
//!
//! - μ_c = (1/M) Σ x, σ²_c = (1/M) Σ (x − μ_c)², s_c = 1/√(σ²_c + ε)
//! - x̂ = (x − μ_c)·s_c,  y = γ_c·x̂ + β_c
//!
//! Backward, given g = ∂L/∂y: ∂L/∂β_c = Σ g, ∂L/∂γ_c = Σ g·x̂, and
//! ∂L/∂x = γ_c·s_c·(g − (∂L/∂β_c)/M − x̂·(∂L/∂γ_c)/M) with batch statistics (μ and σ depend
//! on x), γ_c·s_c·g with running ones. Burn builds the same from reshapes, transposing copies
//! and broadcasts (about a tenth of the DCGAN's training step); here the forward pass reads x
//! twice (statistics, then y) and the backward pass reads x and g twice. Other backends take
//! Burn's `BatchNorm`; a unit test compares the two, values, gradients and running averages.

use crate::conv::kernels::sum;
use crate::conv::{Affine, Dims, batch_statistics, norm_with_backward, planes};
use crate::ops::{f32s, on_flex_f32, tensor, written_in_full};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::BatchNorm;
use burn::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

#[backend_extension(Flex, Autodiff)]
pub trait BatchNormOps: Backend {
    /// γ·(x − μ)/√(σ² + ε) + β over `[N, C, H, W]`, per channel. With `batch_stats`, μ and σ²
    /// are x's own batch statistics and the backward pass differentiates through them.
    fn batch_norm_planes(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
        batch_stats: bool,
    ) -> FloatTensor<Self>;
}

/// `norm.forward(x)` for x `[N, C, H, W]`: on flex (f32) the module docs' one pass each way,
/// elsewhere Burn's own.
pub fn batch_norm(norm: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    if !on_flex_f32(&x) {
        return norm.forward(x);
    }
    let (mean, var, batch_stats) = batch_statistics(norm, &x);
    Tensor::from_dispatch(<Dispatch as BatchNormOps>::batch_norm_planes(
        x.into_dispatch(),
        norm.gamma.val().into_dispatch(),
        norm.beta.val().into_dispatch(),
        mean.into_dispatch(),
        var.into_dispatch(),
        norm.epsilon,
        batch_stats,
    ))
}

/// y = a_c·x + b_c with a_c = γ_c·s_c, b_c = β_c − μ_c·a_c, plane by plane.
fn forward(x: &[f32], d: Dims, affine: &Affine) -> Vec<f32> {
    let (scale, shift) = affine.scale_shift();
    let plane = d.h * d.w;
    if plane == 0 {
        return vec![0.0f32; x.len()];
    }
    let planes = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(p, (y, x))| {
                let (a, b) = (scale[p % d.c], shift[p % d.c]);
                y.iter_mut().zip(x).for_each(|(o, v)| {
                    o.write(a * v + b);
                });
            })
    };
    // SAFETY: each plane of y is written from the plane of x of the same length.
    unsafe { written_in_full(x.len(), planes) }
}

/// (∂L/∂x, ∂L/∂γ, ∂L/∂β) from x, g = ∂L/∂y and the statistics used (the module docs).
fn backward(
    x: &[f32],
    g: &[f32],
    d: Dims,
    bn: &Affine,
    batch_stats: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let plane = d.h * d.w;
    if plane == 0 || d.n == 0 {
        return (vec![0.0f32; x.len()], vec![0.0; d.c], vec![0.0; d.c]);
    }
    // Per channel: Σ g and Σ g·x̂ (planes in f32, the batch in f64).
    let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = (0..d.c)
        .into_par_iter()
        .map(|c| {
            let (m, s) = (bn.mean[c], bn.inv_std[c]);
            let (mut db, mut dg) = (0.0f64, 0.0f64);
            for n in 0..d.n {
                let at = (n * d.c + c) * plane;
                let (x, g) = (&x[at..][..plane], &g[at..][..plane]);
                db += sum(g) as f64;
                let mut acc = [0.0f32; 8];
                let (xs, gs) = (x.chunks_exact(8), g.chunks_exact(8));
                let rest: f32 = xs
                    .remainder()
                    .iter()
                    .zip(gs.remainder())
                    .map(|(v, g)| g * (v - m))
                    .sum();
                for (xv, gv) in xs.zip(gs) {
                    for l in 0..8 {
                        acc[l] += gv[l] * (xv[l] - m);
                    }
                }
                dg += (acc.iter().sum::<f32>() + rest) as f64 * s as f64;
            }
            (db as f32, dg as f32)
        })
        .unzip();
    // ∂L/∂x = k·g + c0 + c1·x with k = γ·s, c1 = −k·s·(∂L/∂γ)/M and
    // c0 = −k·(∂L/∂β)/M − c1·μ (0 and 0 with running statistics).
    let count = (d.n * plane) as f32;
    let planes = |dx: &mut [MaybeUninit<f32>]| {
        dx.par_chunks_mut(plane).enumerate().for_each(|(p, out)| {
            let c = p % d.c;
            let (s, m) = (bn.inv_std[c], bn.mean[c]);
            let k = bn.gamma[c] * s;
            let (c0, c1) = if batch_stats {
                let c1 = -k * s * dgamma[c] / count;
                (-k * dbeta[c] / count - c1 * m, c1)
            } else {
                (0.0, 0.0)
            };
            let (x, g) = (&x[p * plane..][..plane], &g[p * plane..][..plane]);
            for ((o, v), gv) in out.iter_mut().zip(x).zip(g) {
                o.write(k * gv + c0 + c1 * v);
            }
        })
    };
    // SAFETY: each plane of ∂x is written from the planes of x and g of the same length.
    let dx = unsafe { written_in_full(x.len(), planes) };
    (dx, dgamma, dbeta)
}

impl BatchNormOps for Flex {
    fn batch_norm_planes(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        var: FlexTensor,
        epsilon: f64,
        _batch_stats: bool,
    ) -> FlexTensor {
        let (x, d) = planes(&x);
        let affine = Affine::new(&gamma, &beta, &mean, &var, epsilon);
        tensor(forward(f32s(&x), d, &affine), vec![d.n, d.c, d.h, d.w])
    }
}

impl<C: CheckpointStrategy> BatchNormOps for Autodiff<Flex, C> {
    fn batch_norm_planes(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
        batch_stats: bool,
    ) -> FloatTensor<Self> {
        norm_with_backward::<C>(
            [x, gamma, beta],
            [mean, var],
            (epsilon, batch_stats),
            Flex::batch_norm_planes,
            backward,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{close, to_vec};
    use burn::module::{Module, Param};
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    /// Training (batch statistics, running averages updated) and evaluation (running
    /// averages) give Burn's values, gradients of x, γ and β, and running averages.
    #[test]
    fn batch_norm_matches_burn() {
        let d = Device::flex().autodiff();
        d.seed(17);
        for [n, c, h, w] in [[4, 3, 5, 6], [2, 5, 7, 7], [3, 2, 1, 9]] {
            let what = format!("{n}×{c}×{h}×{w}");
            let mut bn = BatchNormConfig::new(c).init(&d);
            let r = |lo, hi| Tensor::<1>::random([c], Distribution::Uniform(lo, hi), &d);
            bn.gamma = Param::from_tensor(r(-1.5, 1.5));
            bn.beta = Param::from_tensor(r(-0.5, 0.5));
            let (ours, theirs) = (bn.clone(), bn.clone());
            let x = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.4, 1.3), &d)
                .require_grad();
            let x2 = x.clone().detach().require_grad();
            let y1 = batch_norm(&ours, x.clone());
            let y2 = theirs.forward(x2.clone());
            close(&to_vec(y1.clone()), &to_vec(y2.clone()), 1e-5, &what);
            let wgt = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d);
            let g1 = (y1 * wgt.clone()).sum().backward();
            let g2 = (y2 * wgt).sum().backward();
            let gx = |t: &Tensor<4>, g| to_vec(t.grad(g).unwrap());
            close(&gx(&x, &g1), &gx(&x2, &g2), 1e-4, &format!("∂x {what}"));
            let gp = |t: &Param<Tensor<1>>, g| to_vec(t.grad(g).unwrap());
            close(&gp(&ours.gamma, &g1), &gp(&theirs.gamma, &g2), 1e-4, "∂γ");
            close(&gp(&ours.beta, &g1), &gp(&theirs.beta, &g2), 1e-4, "∂β");
            let running = |t: &BatchNorm| {
                let mut v = to_vec(t.running_mean.value());
                v.extend(to_vec(t.running_var.value()));
                v
            };
            close(&running(&ours), &running(&theirs), 1e-5, "running averages");
            // Evaluation: the running averages, no autodiff.
            let xe = x.clone().inner();
            let e1 = batch_norm(&ours.clone().valid(), xe.clone());
            let e2 = theirs.clone().valid().forward(xe);
            close(&to_vec(e1), &to_vec(e2), 1e-5, &format!("eval {what}"));
        }
    }
}
