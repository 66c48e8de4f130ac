//! Causal scaled-dot-product attention as one flex operation, forward and backward.
//!
//! Per batch row and head, with queries Q, keys K and values V (`[T, d]` each, d = d_k):
//!
//! ```text
//! S = Q·Kᵀ/√d + M      M_ij = 0 for j ≤ i, −∞ for j > i (position i sees only 0…i)
//! P = softmax(S)       row by row
//! O = P·V
//! ```
//!
//! and backward, from ∂L/∂O:
//!
//! ```text
//! ∂L/∂V = Pᵀ·∂L/∂O
//! ∂L/∂P = ∂L/∂O·Vᵀ
//! ∂L/∂S_ij = P_ij·(∂L/∂P_ij − Σ_k P_ik·∂L/∂P_ik)      (the softmax's Jacobian, one pass a row)
//! ∂L/∂Q = ∂L/∂S·K/√d,   ∂L/∂K = ∂L/∂Sᵀ·Q/√d
//! ```
//!
//! Burn's `MultiHeadAttention` builds this from a transposed copy of every head, a product, a
//! division, a masked fill, a softmax of several passes (its exponential the C library's
//! `expf`, one element at a time) and another product, each a `[batch, heads, T, T]` tensor
//! that the backward pass walks again. Here Q, K and V stay in the layout the projections
//! write (`[batch, T, heads·d]`, the heads side by side), each batch row is one task on one
//! thread, the scores go straight into the softmax (vectorised exponential, the masked half
//! never exponentiated) and only P is kept for the backward pass. Other backends take Burn's
//! operations ([`causal_attention_reference`]); a unit test compares the two, values and
//! gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::attention::generate_autoregressive_mask;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use rayon::prelude::*;

use crate::ops::{
    View, contiguous, exp_nonpositive, f32s, fill_uninit, on_flex_f32, product_into,
    product_uninit, rows, tensor, transposed, written_in_full,
};
use std::mem::MaybeUninit;

#[backend_extension(Flex, Autodiff)]
pub trait AttentionOps: Backend {
    /// [Q | K | V] `[batch, T, 3·heads·d]` → `[batch, T, heads·d]`: softmax(Q·Kᵀ/√d + M)·V
    /// for every batch row and head, M the causal mask.
    fn causal_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
}

/// Causal multi-head attention of projected queries, keys and values side by side,
/// `[batch, T, 3·heads·d]` — Q in the first heads·d columns, K in the next, V in the last, as
/// one projection by the three weight matrices joined column-wise writes them (and head h in
/// columns h·d…(h+1)·d of each, as `MultiHeadAttention`'s projections lay them out) → the
/// heads' outputs side by side, `[batch, T, heads·d]`, ready for the output projection.
/// On flex (f32) one fused operation, whose backward pass writes ∂L/∂[Q | K | V] as one
/// tensor again (so the projection's backward is one product); elsewhere
/// [`causal_attention_reference`] of the three parts.
pub fn causal_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    if !on_flex_f32(&qkv) {
        let w = qkv.dims()[2] / 3;
        let part = |i: usize| qkv.clone().narrow(2, i * w, w);
        return causal_attention_reference(part(0), part(1), part(2), heads);
    }
    Tensor::from_dispatch(<Dispatch as AttentionOps>::causal_attention(
        qkv.into_dispatch(),
        heads,
    ))
}

/// The same with Burn's operations, as `MultiHeadAttention` computes it: heads split into
/// `[batch, heads, T, d]`, scores, the mask of `generate_autoregressive_mask` filled with
/// −10⁴ (Burn's `min_float`; e^−10⁴ is 0 in f32), softmax, the weighted sum, heads joined.
pub fn causal_attention_reference(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
) -> Tensor<3> {
    let [b, t, width] = q.dims();
    let d = width / heads;
    let split = |x: Tensor<3>| x.reshape([b, t, heads, d]).swap_dims(1, 2);
    let mask = generate_autoregressive_mask(b, t, &q.device())
        .reshape([b, 1, t, t])
        .expand([b, heads, t, t]);
    let scores = split(q)
        .matmul(split(k).transpose())
        .div_scalar((d as f32).sqrt())
        .mask_fill(mask, -1.0e4);
    softmax(scores, 3)
        .matmul(split(v))
        .swap_dims(1, 2)
        .reshape([b, t, width])
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    /// The shapes of a `[batch, T, 3·heads·d]` Q | K | V tensor.
    fn of(qkv: &FlexTensor, heads: usize) -> Self {
        let s = qkv.layout().shape();
        let (b, t, width) = (s[0], s[1], s[2] / 3);
        assert!(
            s[2] == 3 * width && heads > 0 && width.is_multiple_of(heads),
            "attention: {} columns do not split into Q, K and V of {heads} heads",
            s[2]
        );
        Dims {
            b,
            t,
            heads,
            d: width / heads,
        }
    }

    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// Columns of the Q | K | V rows.
    fn packed(&self) -> usize {
        3 * self.width()
    }

    /// Head `h`'s `[T, d]` block of one batch row (`row`: that row's T rows of `stride`
    /// values, the heads' columns side by side from its start).
    fn head<'a>(&self, row: &'a [f32], h: usize, stride: usize) -> View<'a> {
        View {
            data: &row[h * self.d..],
            rs: stride,
            cs: 1,
        }
    }

    /// The transpose of head `h`'s block, `[d, T]`.
    fn head_t<'a>(&self, row: &'a [f32], h: usize, stride: usize) -> View<'a> {
        View {
            data: &row[h * self.d..],
            rs: 1,
            cs: stride,
        }
    }
}

/// Lanes of the running maxima and sums: wide enough for the compiler to keep them in vector
/// registers (a single running f32 sum cannot be reordered, so it would stay scalar).
const LANES: usize = 16;

/// The lanes folded by `op` in halves (8 pairs, 4, 2, 1: four vector steps, where a fold
/// from the first lane to the last is fifteen dependent scalar ones).
#[inline(always)]
fn fold_lanes(mut lanes: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            lanes[j] = op(lanes[j], lanes[j + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// max over `x` after scaling it in place by `scale`.
#[inline(always)]
fn scale_and_max(x: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            c[j] *= scale;
            lanes[j] = lanes[j].max(c[j]);
        }
    }
    let mut max = fold_lanes(lanes, f32::max);
    for v in chunks.into_remainder() {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// x ← e^{x − max} in place; returns Σ x.
#[inline(always)]
fn exp_and_sum(x: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            c[j] = exp_nonpositive(c[j] - max);
            lanes[j] += c[j];
        }
    }
    let mut sum = fold_lanes(lanes, |a, b| a + b);
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    sum
}

/// Σ a·b.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            lanes[j] += x[j] * y[j];
        }
    }
    fold_lanes(lanes, |a, b| a + b) + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// How far row i of a causal `[T, T]` block is computed: its i + 1 visible entries rounded up
/// to whole [`LANES`] (at most T), so that every row runs in full vectors. The entries past
/// i in that span are masked and come out 0 all the same.
#[inline(always)]
fn lane_span(i: usize, t: usize) -> usize {
    (i + 1).next_multiple_of(LANES).min(t)
}

/// P = softmax(S·scale + M) in place, row by row, for one `[T, T]` block of scores S: the
/// entries above the diagonal become 0. Row i is computed over its [`lane_span`] with the
/// masked entries there set to −∞ first (e^−∞ is below 2·10⁻³⁸ and the sum is at least 1,
/// so they add nothing), the rest of the row is never exponentiated.
#[inline(always)]
fn causal_softmax_loop(s: &mut [f32], t: usize, scale: f32) {
    for (i, row) in s.chunks_exact_mut(t).enumerate() {
        let span = lane_span(i, t);
        row[i + 1..span].fill(f32::NEG_INFINITY);
        let seen = &mut row[..span];
        let max = scale_and_max(seen, scale);
        let inv = 1.0 / exp_and_sum(seen, max);
        seen.iter_mut().for_each(|x| *x *= inv);
        row[i + 1..].fill(0.0);
    }
}

/// ∂L/∂S·scale in place of ∂L/∂P, row by row: dS_ij = P_ij·(dP_ij − Σ_k P_ik·dP_ik)·scale.
/// Row i of P is zero past column i, and so is row i of dS. Row i is computed over its
/// [`lane_span`] (P is 0 in the masked part of it, so those terms are 0; dP there must be
/// finite, as a product of finite values is).
#[inline(always)]
fn softmax_grad_loop(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    for (i, (pr, gr)) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)).enumerate() {
        let span = lane_span(i, t);
        let (pr, (gr, masked)) = (&pr[..span], gr.split_at_mut(span));
        let dot = dot(pr, gr);
        for (g, &p) in gr.iter_mut().zip(pr) {
            *g = p * (*g - dot) * scale;
        }
        masked.fill(0.0);
    }
}

widest_simd! {
    /// [`causal_softmax_loop`] in the widest vector instructions the processor has.
    fn causal_softmax(s: &mut [f32], t: usize, scale: f32) => causal_softmax_loop
}

widest_simd! {
    /// [`softmax_grad_loop`] in the widest vector instructions the processor has.
    fn softmax_grad(p: &[f32], dp: &mut [f32], t: usize, scale: f32) => softmax_grad_loop
}

/// Rows of the causal products go in blocks of this many: the scores of rows i0..i1 need only
/// the first i1 keys (the others are masked), and a block's products skip the rest — with
/// T = 128 in four blocks, 5/8 of the multiply-adds of the full T×T products.
const CAUSAL_BLOCK: usize = 32;

// A row's lane span (`lane_span`) stays inside its row block, which the products computed.
const _: () = assert!(CAUSAL_BLOCK.is_multiple_of(LANES));

/// The row blocks (i0, i1) of a T-row causal product.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_BLOCK)
        .map(move |i0| (i0, (i0 + CAUSAL_BLOCK).min(t)))
}

/// The part of a matrix from row r, column c on.
fn at(v: View<'_>, r: usize, c: usize) -> View<'_> {
    View {
        data: &v.data[r * v.rs + c * v.cs..],
        ..v
    }
}

/// Forward from Q | K | V `[b, T, 3·heads·d]`: the output `[b, T, heads·d]` and P
/// `[b, heads, T, T]`, both written into new buffers without a zero fill first (the products
/// write every output value; P's part that no product computes — the keys past a row block's
/// last row — is set to 0 directly).
fn forward(dims: Dims, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, t, heads, d } = dims;
    let (w, pw, scale) = (dims.width(), dims.packed(), 1.0 / (d as f32).sqrt());
    let (out_len, p_len) = (b * t * w, b * heads * t * t);
    let mut out = Vec::with_capacity(out_len);
    let mut p = Vec::with_capacity(p_len);
    out.spare_capacity_mut()[..out_len]
        .par_chunks_mut(t * w)
        .zip(p.spare_capacity_mut()[..p_len].par_chunks_mut(heads * t * t))
        .enumerate()
        .for_each(|(r, (out, p))| {
            let q = &qkv[r * t * pw..][..t * pw];
            let (k, v) = (&q[w..], &q[2 * w..]);
            for (h, p) in p.chunks_exact_mut(t * t).enumerate() {
                let (qh, kt) = (dims.head(q, h, pw), dims.head_t(k, h, pw));
                let vh = dims.head(v, h, pw);
                // S = Q·Kᵀ, rows i0..i1 against the first i1 keys only; the rest of those
                // rows is masked: 0
                for (i0, i1) in causal_blocks(t) {
                    product_uninit(&mut p[i0 * t..], t, i1 - i0, i1, d, at(qh, i0, 0), kt);
                    for row in p[i0 * t..i1 * t].chunks_exact_mut(t) {
                        fill_uninit(&mut row[i1..], 0.0);
                    }
                }
                // SAFETY: every value of this head's [T, T] block was written just above
                // (the row blocks cover all T rows; each row's first i1 values by the product,
                // the others by the loop).
                let p = unsafe { p.assume_init_mut() };
                causal_softmax(p, t, scale);
                // O = P·V, rows i0..i1 from the first i1 values
                for (i0, i1) in causal_blocks(t) {
                    let (o, pr) = (&mut out[i0 * w + h * d..], at(rows(p, t), i0, 0));
                    product_uninit(o, w, i1 - i0, d, i1, pr, vh);
                }
            }
        });
    // SAFETY: every P value was written (above); every output value too: the heads' column
    // blocks h·d..(h+1)·d cover the width and each head's row blocks cover the T rows.
    unsafe {
        out.set_len(out_len);
        p.set_len(p_len);
    }
    (out, p)
}

/// Backward: ∂L/∂[Q | K | V] (`[b, T, 3·heads·d]`, laid out as the input) from ∂L/∂O and
/// the forward's P, written into a new buffer without a zero fill first (each product writes
/// its block; the blocks cover every value).
fn backward(dims: Dims, qkv: &[f32], p: &[f32], g: &[f32]) -> Vec<f32> {
    let Dims { b, t, heads, d } = dims;
    let (w, pw, scale) = (dims.width(), dims.packed(), 1.0 / (d as f32).sqrt());
    let batch_rows = |dqkv: &mut [MaybeUninit<f32>]| {
        dqkv.par_chunks_mut(t * pw).enumerate().for_each(|(r, dx)| {
            let q = &qkv[r * t * pw..][..t * pw];
            let (k, v, g) = (&q[w..], &q[2 * w..], &g[r * t * w..][..t * w]);
            let mut ds = vec![0.0f32; t * t];
            for h in 0..heads {
                let p = &p[(r * heads + h) * t * t..][..t * t];
                let go = dims.head(g, h, w);
                let (qh, kh) = (dims.head(q, h, pw), dims.head(k, h, pw));
                let vt = dims.head_t(v, h, pw);
                // ∂L/∂V = Pᵀ·∂L/∂O: rows j0..j1 from the queries i ≥ j0 only (P_ij = 0, i < j)
                let pt = transposed(p, t);
                for (j0, j1) in causal_blocks(t) {
                    let (a, b) = (at(pt, j0, j0), at(go, j0, 0));
                    let dv = &mut dx[j0 * pw + 2 * w + h * d..];
                    product_uninit(dv, pw, j1 - j0, d, t - j0, a, b);
                }
                // ∂L/∂P = ∂L/∂O·Vᵀ (rows i0..i1, first i1 columns), then ∂L/∂S/√d in its place
                for (i0, i1) in causal_blocks(t) {
                    let m = i1 - i0;
                    product_into(
                        &mut ds[i0 * t..],
                        t,
                        m,
                        i1,
                        d,
                        at(go, i0, 0),
                        vt,
                        false,
                        false,
                    );
                }
                softmax_grad(p, &mut ds, t, scale);
                // ∂L/∂Q = ∂L/∂S·K, ∂L/∂K = ∂L/∂Sᵀ·Q (the 1/√d already in ∂L/∂S), each row
                // block over the keys j ≤ i (∂Q) or the queries i ≥ j (∂K) only
                let (dsv, dst) = (rows(&ds, t), transposed(&ds, t));
                for (i0, i1) in causal_blocks(t) {
                    let m = i1 - i0;
                    let dq = &mut dx[i0 * pw + h * d..];
                    product_uninit(dq, pw, m, d, i1, at(dsv, i0, 0), kh);
                    let (a, b) = (at(dst, i0, i0), at(qh, i0, 0));
                    let dk = &mut dx[i0 * pw + w + h * d..];
                    product_uninit(dk, pw, m, d, t - i0, a, b);
                }
            }
        })
    };
    // SAFETY: the products above wrote every value: per head its column block of ∂Q, ∂K and
    // ∂V, per row block its rows, the row blocks covering all T rows.
    unsafe { written_in_full(b * t * pw, batch_rows) }
}

impl AttentionOps for Flex {
    fn causal_attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
        let dims = Dims::of(&qkv, heads);
        let (out, _) = forward(dims, f32s(&contiguous(&qkv)));
        tensor(out, vec![dims.b, dims.t, dims.width()])
    }
}

impl<C: CheckpointStrategy> AttentionOps for Autodiff<Flex, C> {
    fn causal_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl Backward<Flex, 1> for AttentionBackward {
            // Q | K | V (contiguous), P, the shapes
            type State = (FlexTensor, Vec<f32>, Dims);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let (qkv, p, dims) = &ops.state;
                if let [Some(node)] = ops.parents {
                    let g = backward(*dims, f32s(qkv), p, f32s(&grad));
                    let shape = vec![dims.b, dims.t, dims.packed()];
                    grads.register::<Flex>(node.id, tensor(g, shape));
                }
            }
        }

        let nodes = [qkv.node()];
        let qkv = qkv.into_primitive();
        match AttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let dims = Dims::of(&qkv, heads);
                let qkv = contiguous(&qkv);
                let (out, p) = forward(dims, f32s(&qkv));
                let out = tensor(out, vec![dims.b, dims.t, dims.width()]);
                prep.finish((qkv, p, dims), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::causal_attention(qkv, heads)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::tensor::{Device, Distribution};

    /// The fused operation against Burn's: outputs and the gradients of Q, K and V under a
    /// random weighting of the outputs, for T = 1 (a lone position), a short odd T, a T that
    /// leaves a part block of rows (45), and the Transformer's shape (T = 128, 4 heads of 32);
    /// a batch of one and of several.
    #[test]
    fn attention_kernel_matches_burns_operations() {
        let dev = Device::flex().autodiff();
        dev.seed(5);
        for (b, t, heads, d) in [(1, 1, 1, 4), (3, 7, 2, 5), (1, 45, 2, 8), (2, 128, 4, 32)] {
            let w = heads * d;
            let make = || Tensor::<3>::random([b, t, w], Distribution::Normal(0.0, 1.5), &dev);
            let (q0, k0, v0, weight) = (make(), make(), make(), make());
            let run = |fused: bool| {
                let [q, k, v] = [&q0, &k0, &v0].map(|x| x.clone().detach().require_grad());
                let out = if fused {
                    causal_attention(Tensor::cat(vec![q.clone(), k.clone(), v.clone()], 2), heads)
                } else {
                    causal_attention_reference(q.clone(), k.clone(), v.clone(), heads)
                };
                let grads = (out.clone() * weight.clone()).sum().backward();
                let g = [q, k, v].map(|x| to_vec(x.grad(&grads).unwrap()));
                (to_vec(out), g)
            };
            let (out, grads) = run(true);
            let (want, want_grads) = run(false);
            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len());
                for (x, y) in got.iter().zip(want) {
                    assert!(
                        (x - y).abs() <= 2e-5 * y.abs().max(1.0),
                        "{what} (batch {b}, T {t}): {x} vs {y}"
                    );
                }
            };
            close(&out, &want, "output");
            for (name, (g, w)) in ["∂Q", "∂K", "∂V"].iter().zip(grads.iter().zip(&want_grads))
            {
                close(g, w, name);
            }
        }
    }

    /// Position 0 sees only itself (its output is its own value); the last position of a
    /// sequence of equal keys averages all the values.
    #[test]
    fn causal_attention_by_hand() {
        let dev = Device::flex();
        let v = Tensor::<3>::from_floats([[[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]], &dev);
        let q = Tensor::<3>::ones([1, 3, 2], &dev);
        let out = to_vec(causal_attention(Tensor::cat(vec![q.clone(), q, v], 2), 1));
        let want = [1.0, 2.0, 2.0, 3.0, 3.0, 5.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }
}
