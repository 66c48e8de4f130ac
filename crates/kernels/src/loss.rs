//! Softmax cross-entropy from logits as one flex operation, forward and backward.
//!
//! For a row of logits l (one per class) and its target class y:
//!
//! ```text
//! CE(l, y) = −log softmax(l)_y = m + ln Σ_j e^{l_j − m} − l_y      (m = max_j l_j)
//! ∂CE/∂l_j = softmax(l)_j − [j = y]
//! ```
//!
//! and the loss of a batch is the mean over its rows. Burn's `CrossEntropyLoss` computes a
//! log-softmax of several passes (its exponential the C library's `expf`, one element at a
//! time), a gather and a mean, and walks each again backward; here each row is one pass each
//! way (rows shared among threads), the exponential the vectorised one of the other kernels.
//! Other backends take Burn's `CrossEntropyLoss`; a unit test compares the two, values and
//! gradients.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

use crate::ops::{
    contiguous, exp_nonpositive, f32s, on_flex_f32, tensor, unary_with_backward, written_in_full,
};

#[backend_extension(Flex, Autodiff)]
pub trait CrossEntropyOps: Backend {
    /// `[n, classes]` logits and n target classes → `[n, 1]`: −log softmax(l_r)_{y_r} per row.
    /// Only the logits are differentiated.
    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: Arc<Vec<u32>>) -> FloatTensor<Self>;
}

/// The mean softmax cross-entropy of `[n, classes]` logits against n target classes (a `[1]`
/// tensor, as Burn's `CrossEntropyLoss` returns): on flex (f32) one fused operation each way,
/// elsewhere Burn's `CrossEntropyLoss`.
///
/// # Panics
/// When the number of targets is not the number of rows, or (on flex) a target is not a
/// class.
pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let [n, classes] = logits.dims();
    assert_eq!(
        targets.len(),
        n,
        "cross-entropy: {n} rows, {} targets",
        targets.len()
    );
    if !on_flex_f32(&logits) {
        let ids: Vec<i64> = targets.iter().map(|&y| y as i64).collect();
        let device = logits.device();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
        return CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits, targets);
    }
    if let Some(&y) = targets.iter().find(|&&y| y as usize >= classes) {
        panic!("cross-entropy: target class {y} of {classes}");
    }
    let rows: Tensor<2> = Tensor::from_dispatch(<Dispatch as CrossEntropyOps>::cross_entropy_rows(
        logits.into_dispatch(),
        Arc::new(targets.to_vec()),
    ));
    rows.mean()
}

/// Partial maxima and sums kept side by side (one AVX-512 register).
const LANES: usize = 16;

/// (m, Σ_j e^{l_j − m}) of one row: its maximum, and the sum that normalises the softmax.
#[inline(always)]
fn max_and_sum(l: &[f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = l.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for j in 0..LANES {
            lanes[j] = lanes[j].max(c[j]);
        }
    }
    max = lanes.iter().fold(max, |m, &v| m.max(v));
    let mut sums = [0.0f32; LANES];
    let chunks = l.chunks_exact(LANES);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| exp_nonpositive(v - max))
        .sum();
    for c in chunks {
        for j in 0..LANES {
            sums[j] += exp_nonpositive(c[j] - max);
        }
    }
    (max, sums.iter().sum::<f32>() + rest)
}

/// −log softmax(l)_y for each row of `l` (`classes` columns) against its target.
#[inline(always)]
fn loss_loop(l: &[f32], classes: usize, targets: &[u32], out: &mut [MaybeUninit<f32>]) {
    for ((row, &y), o) in l.chunks_exact(classes).zip(targets).zip(out) {
        let (max, sum) = max_and_sum(row);
        o.write(max + sum.ln() - row[y as usize]);
    }
}

/// ∂L/∂l = g_r·(softmax(l_r) − onehot(y_r)) for each row.
#[inline(always)]
fn grad_loop(l: &[f32], classes: usize, targets: &[u32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    let rows = l.chunks_exact(classes).zip(out.chunks_exact_mut(classes));
    for (((row, o), &y), &g) in rows.zip(targets).zip(g) {
        let (max, sum) = max_and_sum(row);
        let scale = g / sum;
        for (o, &v) in o.iter_mut().zip(row) {
            o.write(exp_nonpositive(v - max) * scale);
        }
        let y = y as usize;
        o[y].write(exp_nonpositive(row[y] - max) * scale - g);
    }
}

widest_simd! {
    /// [`loss_loop`] in the widest vector instructions the processor has.
    fn loss_rows(l: &[f32], classes: usize, targets: &[u32], out: &mut [MaybeUninit<f32>]) => loss_loop
}

widest_simd! {
    /// [`grad_loop`] in the widest vector instructions the processor has.
    fn grad_rows(l: &[f32], classes: usize, targets: &[u32], g: &[f32], out: &mut [MaybeUninit<f32>]) => grad_loop
}

/// Rows per thread's task.
const ROWS: usize = 64;

fn shape2(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

impl CrossEntropyOps for Flex {
    fn cross_entropy_rows(logits: FlexTensor, targets: Arc<Vec<u32>>) -> FlexTensor {
        let [n, classes] = shape2(&logits);
        let logits = contiguous(&logits);
        let l = f32s(&logits);
        let blocks = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(ROWS)
                .zip(targets.par_chunks(ROWS))
                .zip(l.par_chunks(ROWS * classes.max(1)))
                .for_each(|((o, y), l)| loss_rows(l, classes, y, o))
        };
        // SAFETY: `loss_rows` writes one value per row of its block; the blocks cover n rows.
        let out = unsafe { written_in_full(n, blocks) };
        tensor(out, vec![n, 1])
    }
}

/// ∂L/∂l from the logits, the targets and ∂L/∂CE_r per row.
fn backward(logits: &FlexTensor, targets: &[u32], grad: &FlexTensor) -> FlexTensor {
    let [n, classes] = shape2(logits);
    let (logits, grad) = (contiguous(logits), contiguous(grad));
    let (l, g) = (f32s(&logits), f32s(&grad));
    let blocks = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut((ROWS * classes).max(1))
            .zip(l.par_chunks((ROWS * classes).max(1)))
            .zip(targets.par_chunks(ROWS).zip(g.par_chunks(ROWS)))
            .for_each(|((o, l), (y, g))| grad_rows(l, classes, y, g, o))
    };
    // SAFETY: `grad_rows` writes every value of each row of its block; the blocks cover all.
    let out = unsafe { written_in_full(n * classes, blocks) };
    tensor(out, vec![n, classes])
}

impl<C: CheckpointStrategy> CrossEntropyOps for Autodiff<Flex, C> {
    fn cross_entropy_rows(logits: FloatTensor<Self>, targets: Arc<Vec<u32>>) -> FloatTensor<Self> {
        let kept = targets.clone();
        unary_with_backward::<C, _>(
            logits,
            |l| Flex::cross_entropy_rows(l, targets),
            move |l, g| backward(l, &kept, g),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::tensor::{Device, Distribution};

    /// The fused loss against Burn's `CrossEntropyLoss`: the loss and ∂L/∂logits, for fewer
    /// classes than a vector's lanes, a number that leaves a remainder (the character
    /// models' vocabularies), large logits (the max keeps e^x finite) and enough rows to be
    /// shared among threads.
    #[test]
    fn cross_entropy_matches_burns_loss() {
        let dev = Device::flex().autodiff();
        dev.seed(8);
        for (n, classes, spread) in [(5, 3, 1.0), (300, 97, 3.0), (70, 16, 40.0), (1, 1, 1.0)] {
            let l0 = Tensor::<2>::random([n, classes], Distribution::Normal(0.5, spread), &dev);
            let targets: Vec<u32> = (0..n).map(|r| ((r * 7 + 3) % classes) as u32).collect();
            let run = |fused: bool| {
                let l = l0.clone().detach().require_grad();
                let loss = if fused {
                    cross_entropy(l.clone(), &targets)
                } else {
                    let ids: Vec<i64> = targets.iter().map(|&y| y as i64).collect();
                    let t = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &dev);
                    CrossEntropyLossConfig::new()
                        .init(&dev)
                        .forward(l.clone(), t)
                };
                let grads = loss.clone().mul_scalar(3.0).backward();
                (to_vec(loss), to_vec(l.grad(&grads).unwrap()))
            };
            let ((loss, grad), (want, want_grad)) = (run(true), run(false));
            assert_eq!(loss.len(), 1);
            let tolerance = 1e-5 * want[0].abs().max(1.0);
            assert!(
                (loss[0] - want[0]).abs() <= tolerance,
                "{n}×{classes}: {loss:?} vs {want:?}"
            );
            assert_eq!(grad.len(), want_grad.len());
            for (a, b) in grad.iter().zip(&want_grad) {
                assert!((a - b).abs() <= 1e-6, "{n}×{classes}: ∂l {a} vs {b}");
            }
        }
    }

    /// The worked example: logits (0, ln 3) and target 1 — softmax (¼, ¾), loss −ln ¾, and
    /// ∂/∂l = (¼, −¼) for a batch of one.
    #[test]
    fn cross_entropy_by_hand() {
        let dev = Device::flex().autodiff();
        let l = Tensor::<2>::from_floats([[0.0, 3.0f32.ln()]], &dev).require_grad();
        let loss = cross_entropy(l.clone(), &[1]);
        let grads = loss.clone().backward();
        assert!((to_vec(loss)[0] - (4.0f32 / 3.0).ln()).abs() < 1e-6);
        let g = to_vec(l.grad(&grads).unwrap());
        assert!(
            (g[0] - 0.25).abs() < 1e-6 && (g[1] + 0.25).abs() < 1e-6,
            "{g:?}"
        );
    }
}
