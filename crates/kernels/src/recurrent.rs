//! A whole LSTM or GRU layer over a sequence as one flex operation, forward and backward —
//! what PyTorch's and cuDNN's recurrent layers do, instead of a graph of small operations per
//! time step. For a sequence x_1…x_T (`[T, B, I]`, time-major) and a layer of width H:
//!
//! 1. the input projection of all T steps is **one** matrix product,
//!    P = X·W_x + b (`[T·B, I]·[I, G·H]`, G = 4 gates for an LSTM, 3 for a GRU);
//! 2. inside the loop over t only h_{t−1}·W_h (`[B, H]·[H, G·H]`, W_h packed once per sequence
//!    for kiln's register kernel, `packed`) and the gates, fused into one pass over `[B, H]`
//!    (rows shared among threads, σ and tanh as vectorised polynomials);
//! 3. backward, the loop runs t = T…1 carrying ∂L/∂h and ∂L/∂c, with one product per step,
//!    ∂L/∂h_{t−1} += ∂L/∂z_t·W_hᵀ; the weight gradients are then one product each over all
//!    steps: ∂L/∂W_x = Xᵀ·∂L/∂Z, ∂L/∂W_h = H_{prev}ᵀ·∂L/∂Z, ∂L/∂X = ∂L/∂Z·W_xᵀ, and ∂L/∂b the
//!    column sums of ∂L/∂Z.
//!
//! LSTM (course deck 3), gates side by side in the order i, f, o, g:
//!
//! [z_i z_f z_o z_g] = x_t·W_x + h_{t−1}·W_h + b
//! c_t = σ(z_f) ⊙ c_{t−1} + σ(z_i) ⊙ tanh(z_g),  h_t = σ(z_o) ⊙ tanh(c_t)
//!
//! and backward, with δh = ∂L/∂h_t (from the output and from step t + 1), i, f, o, g the gates
//! after their non-linearities:
//!
//! δc = ∂L/∂c_t + δh ⊙ o ⊙ (1 − tanh²c_t),
//! ∂L/∂z_i = δc ⊙ g ⊙ i(1 − i),  ∂L/∂z_f = δc ⊙ c_{t−1} ⊙ f(1 − f),
//! ∂L/∂z_o = δh ⊙ tanh c_t ⊙ o(1 − o),  ∂L/∂z_g = δc ⊙ i ⊙ (1 − g²),  ∂L/∂c_{t−1} = δc ⊙ f.
//!
//! GRU (PyTorch's and Burn's "reset after" form), gates z, r, n:
//!
//! z = σ(x W_xz + b_xz + h W_hz + b_hz),  r = σ(x W_xr + b_xr + h W_hr + b_hr)
//! n = tanh(x W_xn + b_xn + r ⊙ (h W_hn + b_hn)),  h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}
//!
//! Other backends (and f64, or a sequence on flex that is not f32) take [`lstm_reference`] and
//! [`gru_reference`]: the same formulas in Burn's operations, one step at a time. Unit tests
//! compare the two, values and gradients.

use std::ops::Range;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::ops::{
    View, contiguous, exp_nonpositive, f32s, new_product, on_flex_f32, product, rows, sigmoid,
    tensor, transposed,
};
use crate::packed::{BLOCKED_MIN_ROWS, PackedRhs, large_product, new_large_product};

#[backend_extension(Flex, Autodiff)]
pub trait RecurrentOps: Backend {
    /// One LSTM layer: x `[T, B, I]`, W_x `[I, 4H]`, W_h `[H, 4H]`, b `[4H]`, h₀ and c₀
    /// `[B, H]` → `[T + 1, B, H]`: h_1 … h_T, then c_T.
    fn lstm_layer(
        x: FloatTensor<Self>,
        w_x: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// One GRU layer: x `[T, B, I]`, W_x `[I, 3H]`, W_h `[H, 3H]`, b_x and b_h `[3H]`, h₀
    /// `[B, H]` → h_1 … h_T `[T, B, H]`.
    fn gru_layer(
        x: FloatTensor<Self>,
        w_x: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_x: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// An LSTM layer over x `[T, B, I]` from (h₀, c₀): h_1 … h_T `[T, B, H]` and c_T. W_x
/// `[I, 4H]`, W_h `[H, 4H]` and b `[4H]` hold the gates i, f, o, g side by side. On flex (f32)
/// one fused operation; elsewhere [`lstm_reference`].
pub fn lstm(
    x: Tensor<3>,
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b: Tensor<1>,
    h0: Tensor<2>,
    c0: Tensor<2>,
) -> (Tensor<3>, Tensor<2>) {
    let [t, batch, _] = x.dims();
    if t == 0 || !on_flex_f32(&x) {
        return lstm_reference(x, w_x, w_h, b, h0, c0);
    }
    let hidden = h0.dims()[1];
    let packed: Tensor<3> = Tensor::from_dispatch(<Dispatch as RecurrentOps>::lstm_layer(
        x.into_dispatch(),
        w_x.into_dispatch(),
        w_h.into_dispatch(),
        b.into_dispatch(),
        h0.into_dispatch(),
        c0.into_dispatch(),
    ));
    let c = packed.clone().narrow(0, t, 1).reshape([batch, hidden]);
    (packed.narrow(0, 0, t), c)
}

/// A GRU layer over x `[T, B, I]` from h₀: h_1 … h_T `[T, B, H]`. W_x `[I, 3H]`, W_h
/// `[H, 3H]`, b_x, b_h `[3H]` hold the gates z, r, n side by side. On flex (f32) one fused
/// operation; elsewhere [`gru_reference`].
pub fn gru(
    x: Tensor<3>,
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b_x: Tensor<1>,
    b_h: Tensor<1>,
    h0: Tensor<2>,
) -> Tensor<3> {
    if x.dims()[0] == 0 || !on_flex_f32(&x) {
        return gru_reference(x, w_x, w_h, b_x, b_h, h0);
    }
    Tensor::from_dispatch(<Dispatch as RecurrentOps>::gru_layer(
        x.into_dispatch(),
        w_x.into_dispatch(),
        w_h.into_dispatch(),
        b_x.into_dispatch(),
        b_h.into_dispatch(),
        h0.into_dispatch(),
    ))
}

/// [`lstm`] in Burn's operations over steps `[B, I]` (the path of every other backend).
pub fn lstm_steps(
    steps: Vec<Tensor<2>>,
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b: Tensor<1>,
    h0: Tensor<2>,
    c0: Tensor<2>,
) -> (Vec<Tensor<2>>, Tensor<2>) {
    let h_dim = h0.dims()[1];
    let b = b.unsqueeze::<2>();
    let (mut h, mut c) = (h0, c0);
    let mut out = Vec::with_capacity(steps.len());
    for x in steps {
        let z = x.matmul(w_x.clone()) + h.matmul(w_h.clone()) + b.clone(); // [B, 4H]
        let [batch, _] = z.dims();
        let s = burn::tensor::activation::sigmoid(z.clone().slice([0..batch, 0..3 * h_dim]));
        let g = z.slice([0..batch, 3 * h_dim..4 * h_dim]).tanh();
        let i = s.clone().slice([0..batch, 0..h_dim]);
        let f = s.clone().slice([0..batch, h_dim..2 * h_dim]);
        let o = s.slice([0..batch, 2 * h_dim..3 * h_dim]);
        c = f * c + i * g;
        h = o * c.clone().tanh();
        out.push(h.clone());
    }
    (out, c)
}

/// [`gru`] in Burn's operations over steps `[B, I]` (the path of every other backend).
pub fn gru_steps(
    steps: Vec<Tensor<2>>,
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b_x: Tensor<1>,
    b_h: Tensor<1>,
    h0: Tensor<2>,
) -> Vec<Tensor<2>> {
    let h_dim = h0.dims()[1];
    let (b_x, b_h) = (b_x.unsqueeze::<2>(), b_h.unsqueeze::<2>());
    let mut h = h0;
    let mut out = Vec::with_capacity(steps.len());
    for x in steps {
        let gx = x.matmul(w_x.clone()) + b_x.clone(); // [B, 3H]
        let gh = h.clone().matmul(w_h.clone()) + b_h.clone();
        let [batch, _] = gx.dims();
        let zr = burn::tensor::activation::sigmoid(
            gx.clone().slice([0..batch, 0..2 * h_dim]) + gh.clone().slice([0..batch, 0..2 * h_dim]),
        );
        let z = zr.clone().slice([0..batch, 0..h_dim]);
        let r = zr.slice([0..batch, h_dim..2 * h_dim]);
        let n = (gx.slice([0..batch, 2 * h_dim..3 * h_dim])
            + r * gh.slice([0..batch, 2 * h_dim..3 * h_dim]))
        .tanh();
        // h_t = (1 − z) ⊙ n + z ⊙ h_{t−1} = n + z ⊙ (h_{t−1} − n)
        h = n.clone() + z * (h - n);
        out.push(h.clone());
    }
    out
}

/// The steps of a time-major `[T, B, F]` tensor.
fn unstack(x: Tensor<3>) -> Vec<Tensor<2>> {
    let [_, b, f] = x.dims();
    x.iter_dim(0).map(|s| s.reshape([b, f])).collect()
}

/// [`lstm`] in Burn's operations, whole sequences (the unit tests' reference).
pub fn lstm_reference(
    x: Tensor<3>,
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b: Tensor<1>,
    h0: Tensor<2>,
    c0: Tensor<2>,
) -> (Tensor<3>, Tensor<2>) {
    let [_, batch, _] = x.dims();
    let hidden = h0.dims()[1];
    let device = x.device();
    let (out, c) = lstm_steps(unstack(x), w_x, w_h, b, h0, c0);
    let out = if out.is_empty() {
        Tensor::zeros([0, batch, hidden], &device)
    } else {
        Tensor::stack(out, 0)
    };
    (out, c)
}

/// [`gru`] in Burn's operations, whole sequences (the unit tests' reference).
pub fn gru_reference(
    x: Tensor<3>,
    w_x: Tensor<2>,
    w_h: Tensor<2>,
    b_x: Tensor<1>,
    b_h: Tensor<1>,
    h0: Tensor<2>,
) -> Tensor<3> {
    let [_, batch, _] = x.dims();
    let hidden = h0.dims()[1];
    let device = x.device();
    let out = gru_steps(unstack(x), w_x, w_h, b_x, b_h, h0);
    if out.is_empty() {
        Tensor::zeros([0, batch, hidden], &device)
    } else {
        Tensor::stack(out, 0)
    }
}

// ---------------------------------------------------------------------------------------
// The kernels, on f32 slices.

/// tanh(x) = sign(x)·(1 − e)/(1 + e) with e = e^{−2|x|} ≤ 1: no overflow, vectorises
/// (within 1.2·10⁻⁷ of the library's tanh, absolutely: unit test).
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * x.abs());
    let t = (1.0 - e) / (1.0 + e);
    t.copysign(x)
}

/// Products of at least this many multiply-adds share the threads (flex's own threshold is
/// 192³; a step of the recurrence, 64·256·1024, is below it and still gains from both cores).
const PARALLEL_PRODUCT: usize = 1 << 18;

/// out `[m, n]` (row-major) = a `[m, k]` · b `[k, n]`, added to out's values when
/// `accumulate`: the layer's products over all steps (the input projection, the weight
/// gradients, ∂L/∂X). Large ones by [`large_product`] (the packed kernel, blocked, on all
/// threads), small ones — and a product of a row or few, as when sampling — by the `gemm`
/// crate.
fn matmul(out: &mut [f32], m: usize, n: usize, k: usize, a: View, b: View, accumulate: bool) {
    if blocked(m, n, k) {
        large_product(out, n, m, n, k, a, b, accumulate);
    } else {
        product(out, m, n, k, a, b, accumulate, threaded(m, n, k));
    }
}

/// Whether a product shares the threads ([`PARALLEL_PRODUCT`]).
fn threaded(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= PARALLEL_PRODUCT
}

/// Whether [`matmul`] takes kiln's blocked product: large, with enough rows to pay for packing.
fn blocked(m: usize, n: usize, k: usize) -> bool {
    threaded(m, n, k) && m >= BLOCKED_MIN_ROWS
}

/// a `[m, k]` · b `[k, n]` as a new row-major buffer ([`matmul`]), written without a zero fill
/// first.
fn new_matmul(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f32> {
    if blocked(m, n, k) {
        new_large_product(m, n, k, a, b)
    } else {
        new_product(m, n, k, a, b, threaded(m, n, k))
    }
}

/// Σ over rows of a row-major `[rows, cols]` matrix → `[cols]`.
fn column_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0f32; cols];
    for row in x.chunks_exact(cols) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    sums
}

/// Every row of `out` `[rows, cols]` = `bias`.
fn broadcast_rows(bias: &[f32], rows: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    out
}

/// The rows (sequences) of the batch each thread carries through all T steps: the batch split
/// evenly among the threads, or one part when it is small (sampling one sequence at a time),
/// whose products then use every thread. The rows of a recurrence are independent of each
/// other, so each thread runs its own loop over t with no synchronisation between steps.
fn row_parts(batch: usize, hidden: usize) -> Vec<Range<usize>> {
    let parts = if batch * hidden < 8192 {
        1
    } else {
        rayon::current_num_threads().clamp(1, batch)
    };
    let per = batch.div_ceil(parts).max(1);
    (0..batch)
        .step_by(per)
        .map(|r| r..(r + per).min(batch))
        .collect()
}

/// Runs `task` on every part of the rows, in parallel when there are several; the products
/// inside a task use every thread only when it is the only part.
fn for_parts<R: Send>(
    parts: Vec<Range<usize>>,
    task: impl Fn(Range<usize>, bool) -> R + Sync + Send,
) -> Vec<R> {
    if parts.len() == 1 {
        parts.into_iter().map(|r| task(r, true)).collect()
    } else {
        parts.into_par_iter().map(|r| task(r, false)).collect()
    }
}

/// Rows `rows` of step `step` of a time-major `[T, batch, width]` buffer.
fn part_rows<'a>(
    buf: &'a [f32],
    step: usize,
    batch: usize,
    rows: &Range<usize>,
    width: usize,
) -> &'a [f32] {
    &buf[(step * batch + rows.start) * width..(step * batch + rows.end) * width]
}

/// A buffer that several threads write at once, each in its own rows of every step.
#[derive(Clone, Copy)]
struct Shared {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: `Shared` only hands out slices through `part`, whose callers guarantee that no two
// threads hold overlapping ranges.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(buf: &mut [f32]) -> Shared {
        Shared {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// No other live slice from the same buffer overlaps this one, and the buffer outlives it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "a part inside its buffer");
        // SAFETY: in bounds (checked); disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// The sizes of one layer's sequence.
#[derive(Clone, Copy, Debug)]
struct Dims {
    /// T, B, I, H.
    t: usize,
    b: usize,
    i: usize,
    h: usize,
}

impl Dims {
    fn of(x: &FlexTensor, h0: &FlexTensor) -> Dims {
        let s = x.layout().shape();
        Dims {
            t: s[0],
            b: s[1],
            i: s[2],
            h: h0.layout().shape()[1],
        }
    }
}

// --- LSTM -------------------------------------------------------------------------------

/// What the LSTM's backward pass keeps from the forward pass: the gates after their
/// non-linearities `[T, B, 4H]` and c_1 … c_T `[T, B, H]`.
#[derive(Debug, Clone)]
struct LstmSaved {
    gates: Arc<Vec<f32>>,
    cells: Arc<Vec<f32>>,
}

/// The four gate blocks (i, f, o, g) of one row `[4H]`, each `[n]` = `[H]`.
#[inline(always)]
fn quarters(row: &[f32], n: usize) -> [&[f32]; 4] {
    [
        &row[..n],
        &row[n..2 * n],
        &row[2 * n..3 * n],
        &row[3 * n..4 * n],
    ]
}

/// One row of a step: the pre-activations z = x_t·W_x (in `z`) + h_{t−1}·W_h (`zh`) + b
/// `[4H]` become the gates (i, f, o, g), kept in `z`, and c = f ⊙ c_prev + i ⊙ g,
/// h = o ⊙ tanh(c).
#[inline(always)]
fn lstm_row_loop(
    z: &mut [f32],
    zh: &[f32],
    bias: &[f32],
    c_prev: &[f32],
    c: &mut [f32],
    h: &mut [f32],
) {
    let n = c.len();
    let (zi, rest) = z.split_at_mut(n);
    let (zf, rest) = rest.split_at_mut(n);
    let (zo, zg) = rest.split_at_mut(n);
    let (zg, c_prev, h) = (&mut zg[..n], &c_prev[..n], &mut h[..n]);
    let [hi, hf, ho, hg] = quarters(zh, n);
    let [bi, bf, bo, bg] = quarters(bias, n);
    for j in 0..n {
        let i = sigmoid(zi[j] + hi[j] + bi[j]);
        let f = sigmoid(zf[j] + hf[j] + bf[j]);
        let o = sigmoid(zo[j] + ho[j] + bo[j]);
        let g = tanh(zg[j] + hg[j] + bg[j]);
        let cj = f * c_prev[j] + i * g;
        (zi[j], zf[j], zo[j], zg[j]) = (i, f, o, g);
        c[j] = cj;
        h[j] = o * tanh(cj);
    }
}

widest_simd! {
    /// [`lstm_row_loop`] in the widest vector instructions the processor has.
    fn lstm_row(
        z: &mut [f32],
        zh: &[f32],
        bias: &[f32],
        c_prev: &[f32],
        c: &mut [f32],
        h: &mut [f32]
    ) => lstm_row_loop
}

/// One row of a step backward. In: the gates (i, f, o, g), c_t, c_{t−1}, ∂L/∂h_t from the
/// output and from step t + 1, ∂L/∂c_t (overwritten with ∂L/∂c_{t−1}). Out: ∂L/∂z `[4H]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lstm_back_row_loop(
    gates: &[f32],
    c: &[f32],
    c_prev: &[f32],
    dh_out: &[f32],
    dh_next: &[f32],
    dc: &mut [f32],
    dz: &mut [f32],
) {
    let n = dc.len();
    let [gi, gf, go, gg] = quarters(gates, n);
    let (c, c_prev, dh_out, dh_next) = (&c[..n], &c_prev[..n], &dh_out[..n], &dh_next[..n]);
    let (dzi, rest) = dz.split_at_mut(n);
    let (dzf, rest) = rest.split_at_mut(n);
    let (dzo, dzg) = rest.split_at_mut(n);
    let dzg = &mut dzg[..n];
    for j in 0..n {
        let (i, f, o, g) = (gi[j], gf[j], go[j], gg[j]);
        let tc = tanh(c[j]);
        let dh = dh_out[j] + dh_next[j];
        let dcc = dc[j] + dh * o * (1.0 - tc * tc);
        dzi[j] = dcc * g * (i * (1.0 - i));
        dzf[j] = dcc * c_prev[j] * (f * (1.0 - f));
        dzo[j] = dh * tc * (o * (1.0 - o));
        dzg[j] = dcc * i * (1.0 - g * g);
        dc[j] = dcc * f;
    }
}

widest_simd! {
    /// [`lstm_back_row_loop`] in the widest vector instructions the processor has.
    fn lstm_back_row(
        gates: &[f32],
        c: &[f32],
        c_prev: &[f32],
        dh_out: &[f32],
        dh_next: &[f32],
        dc: &mut [f32],
        dz: &mut [f32]
    ) => lstm_back_row_loop
}

/// The forward pass: `[T + 1, B, H]` (h_1 … h_T, c_T) and what backward needs.
#[allow(clippy::too_many_arguments)]
fn lstm_forward(
    d: Dims,
    x: &[f32],
    w_x: &[f32],
    w_h: &[f32],
    bias: &[f32],
    h0: &[f32],
    c0: &[f32],
) -> (Vec<f32>, LstmSaved) {
    let Dims { t, b, i, h } = d;
    let (g4, bh) = (4 * h, b * h);
    // X·W_x for every step at once (the bias joins in the gates' pass).
    let mut z = new_matmul(t * b, g4, i, rows(x, i), rows(w_x, g4));
    let mut out = vec![0f32; (t + 1) * bh];
    let mut cells = vec![0f32; t * bh];
    let (zs, hs, cs) = (
        Shared::new(&mut z),
        Shared::new(&mut out),
        Shared::new(&mut cells),
    );
    let parts = row_parts(b, h);
    let w_h = PackedRhs::new(rows(w_h, g4), h, g4, parts.len() > 1 && t > 1);
    for_parts(parts, |rr, threads| {
        let (r0, n) = (rr.start, rr.len());
        // h_{t−1}·W_h of this part's rows: a buffer that stays in the cache from step to step
        // (the product adds nothing to the sequence-long z, read and written once, by the gates).
        let mut zh = vec![0f32; n * g4];
        for s in 0..t {
            // SAFETY: this task alone touches rows r0..r0 + n of each step, and the parts of
            // steps s − 1 and s are disjoint.
            let (z, h_prev, c_prev, c, hh) = unsafe {
                (
                    zs.part((s * b + r0) * g4, n * g4),
                    match s {
                        0 => &h0[r0 * h..(r0 + n) * h],
                        _ => &*hs.part(((s - 1) * b + r0) * h, n * h),
                    },
                    match s {
                        0 => &c0[r0 * h..(r0 + n) * h],
                        _ => &*cs.part(((s - 1) * b + r0) * h, n * h),
                    },
                    cs.part((s * b + r0) * h, n * h),
                    hs.part((s * b + r0) * h, n * h),
                )
            };
            w_h.product(&mut zh, n, h_prev, false, threads);
            for r in 0..n {
                lstm_row(
                    &mut z[r * g4..(r + 1) * g4],
                    &zh[r * g4..(r + 1) * g4],
                    bias,
                    &c_prev[r * h..(r + 1) * h],
                    &mut c[r * h..(r + 1) * h],
                    &mut hh[r * h..(r + 1) * h],
                );
            }
        }
    });
    let c_last = if t == 0 { c0 } else { &cells[(t - 1) * bh..] };
    out[t * bh..].copy_from_slice(&c_last[..bh]);
    (
        out,
        LstmSaved {
            gates: Arc::new(z),
            cells: Arc::new(cells),
        },
    )
}

/// The gradients of an LSTM layer (its one bias is [`WeightGrads::b_x`]).
struct LstmGrads {
    w: WeightGrads,
    h0: Vec<f32>,
    c0: Vec<f32>,
}

/// The backward pass, from `grad` = ∂L/∂(h_1 … h_T, c_T) `[T + 1, B, H]`.
#[allow(clippy::too_many_arguments)]
fn lstm_backward(
    d: Dims,
    x: &[f32],
    w_x: &[f32],
    w_h: &[f32],
    h0: &[f32],
    c0: &[f32],
    out: &[f32],
    saved: &LstmSaved,
    grad: &[f32],
    need_x: bool,
) -> LstmGrads {
    let Dims { t, b, h, .. } = d;
    let g4 = 4 * h;
    let (gates, cells) = (&saved.gates[..], &saved.cells[..]);
    let mut dz = vec![0f32; t * b * g4];
    let parts = row_parts(b, h);
    let w_ht = PackedRhs::new(transposed(w_h, g4), g4, h, parts.len() > 1 && t > 1);
    let dzs = Shared::new(&mut dz);
    // Per part of the rows: ∂L/∂h₀ and ∂L/∂c₀.
    let ends = for_parts(parts, |rr, threads| {
        let (r0, n) = (rr.start, rr.len());
        let at = |buf, step| part_rows(buf, step, b, &rr, h);
        let mut dh_next = vec![0f32; n * h];
        let mut dc = at(grad, t).to_vec();
        for s in (0..t).rev() {
            let c_prev = if s == 0 {
                &c0[r0 * h..(r0 + n) * h]
            } else {
                at(cells, s - 1)
            };
            let (c_now, dh_out) = (at(cells, s), at(grad, s));
            let g_now = &gates[(s * b + r0) * g4..(s * b + r0 + n) * g4];
            // SAFETY: this task alone touches rows r0..r0 + n of each step.
            let dz = unsafe { dzs.part((s * b + r0) * g4, n * g4) };
            for r in 0..n {
                let span = r * h..(r + 1) * h;
                lstm_back_row(
                    &g_now[r * g4..(r + 1) * g4],
                    &c_now[span.clone()],
                    &c_prev[span.clone()],
                    &dh_out[span.clone()],
                    &dh_next[span.clone()],
                    &mut dc[span],
                    &mut dz[r * g4..(r + 1) * g4],
                );
            }
            // ∂L/∂h_{t−1} (through the recurrence) = ∂L/∂z_t·W_hᵀ
            w_ht.product(&mut dh_next, n, dz, false, threads);
        }
        (dh_next, dc)
    });
    let (dh_next, dc): (Vec<_>, Vec<_>) = ends.into_iter().unzip();
    let (dh_next, dc) = (dh_next.concat(), dc.concat());
    LstmGrads {
        w: weight_grads(d, 4, x, w_x, h0, out, &dz, None, need_x),
        h0: dh_next,
        c0: dc,
    }
}

/// The gradients every recurrent layer computes after its loop backward.
struct WeightGrads {
    /// ∂L/∂X, when X needs one.
    x: Option<Vec<f32>>,
    w_x: Vec<f32>,
    w_h: Vec<f32>,
    b_x: Vec<f32>,
    /// ∂L/∂b_h where it differs from ∂L/∂b_x (the GRU's).
    b_h: Option<Vec<f32>>,
}

/// [`WeightGrads`], with `dzx` = ∂L/∂(x·W_x) and `dzh` = ∂L/∂(h·W_h) per step `[T·B, G·H]`
/// (`None`: the same as `dzx`, as in an LSTM): ∂L/∂X = dzx·W_xᵀ (when needed),
/// ∂L/∂W_x = Xᵀ·dzx, ∂L/∂W_h = [h₀; h_1 … h_{T−1}]ᵀ·dzh, and the biases' column sums.
#[allow(clippy::too_many_arguments)]
fn weight_grads(
    d: Dims,
    gates: usize,
    x: &[f32],
    w_x: &[f32],
    h0: &[f32],
    out: &[f32],
    dzx: &[f32],
    dzh: Option<&[f32]>,
    need_x: bool,
) -> WeightGrads {
    let Dims { t, b, i, h } = d;
    let dzh_or_dzx = dzh.unwrap_or(dzx);
    let (g, bh) = (gates * h, b * h);
    let dx = need_x.then(|| new_matmul(t * b, i, g, rows(dzx, g), transposed(w_x, g)));
    let dw_x = new_matmul(i, g, t * b, transposed(x, i), rows(dzx, g));
    let mut dw_h = vec![0f32; h * g];
    matmul(
        &mut dw_h,
        h,
        g,
        b,
        transposed(h0, h),
        rows(dzh_or_dzx, g),
        false,
    );
    if t > 1 {
        matmul(
            &mut dw_h,
            h,
            g,
            (t - 1) * b,
            transposed(&out[..(t - 1) * bh], h),
            rows(&dzh_or_dzx[b * g..], g),
            true,
        );
    }
    WeightGrads {
        x: dx,
        w_x: dw_x,
        w_h: dw_h,
        b_x: column_sums(dzx, g),
        b_h: dzh.map(|dzh| column_sums(dzh, g)),
    }
}

/// The inputs of a layer as contiguous f32 tensors.
fn inputs<const N: usize>(ts: [&FlexTensor; N]) -> [FlexTensor; N] {
    ts.map(contiguous)
}

impl RecurrentOps for Flex {
    fn lstm_layer(
        x: FlexTensor,
        w_x: FlexTensor,
        w_h: FlexTensor,
        b: FlexTensor,
        h0: FlexTensor,
        c0: FlexTensor,
    ) -> FlexTensor {
        let d = Dims::of(&x, &h0);
        let [x, w_x, w_h, b, h0, c0] = inputs([&x, &w_x, &w_h, &b, &h0, &c0]);
        let (out, _) = lstm_forward(
            d,
            f32s(&x),
            f32s(&w_x),
            f32s(&w_h),
            f32s(&b),
            f32s(&h0),
            f32s(&c0),
        );
        tensor(out, vec![d.t + 1, d.b, d.h])
    }

    fn gru_layer(
        x: FlexTensor,
        w_x: FlexTensor,
        w_h: FlexTensor,
        b_x: FlexTensor,
        b_h: FlexTensor,
        h0: FlexTensor,
    ) -> FlexTensor {
        let d = Dims::of(&x, &h0);
        let [x, w_x, w_h, b_x, b_h, h0] = inputs([&x, &w_x, &w_h, &b_x, &b_h, &h0]);
        let (out, _) = gru_forward(
            d,
            f32s(&x),
            f32s(&w_x),
            f32s(&w_h),
            f32s(&b_x),
            f32s(&b_h),
            f32s(&h0),
        );
        tensor(out, vec![d.t, d.b, d.h])
    }
}

// --- GRU --------------------------------------------------------------------------------

/// What the GRU's backward pass keeps: the gates (z, r, n) after their non-linearities
/// `[T, B, 3H]` and h_{t−1}·W_hn + b_hn `[T, B, H]`.
#[derive(Debug, Clone)]
struct GruSaved {
    gates: Arc<Vec<f32>>,
    hn: Arc<Vec<f32>>,
}

/// One row of a step: gx `[3H]` (x·W_x + b_x, overwritten with z, r, n), gh `[3H]`
/// (h_{t−1}·W_h + b_h), h_{t−1} → h_t, and h_{t−1}·W_hn + b_hn kept.
#[inline(always)]
fn gru_row_loop(gx: &mut [f32], gh: &[f32], h_prev: &[f32], h: &mut [f32], hn: &mut [f32]) {
    let n = h.len();
    let (xz, rest) = gx.split_at_mut(n);
    let (xr, xn) = rest.split_at_mut(n);
    let xn = &mut xn[..n];
    let (hz, hr, hh) = (&gh[..n], &gh[n..2 * n], &gh[2 * n..3 * n]);
    let (h_prev, hn) = (&h_prev[..n], &mut hn[..n]);
    for j in 0..n {
        let z = sigmoid(xz[j] + hz[j]);
        let r = sigmoid(xr[j] + hr[j]);
        let nn = tanh(xn[j] + r * hh[j]);
        (xz[j], xr[j], xn[j]) = (z, r, nn);
        hn[j] = hh[j];
        h[j] = nn + z * (h_prev[j] - nn);
    }
}

widest_simd! {
    /// [`gru_row_loop`] in the widest vector instructions the processor has.
    fn gru_row(gx: &mut [f32], gh: &[f32], h_prev: &[f32], h: &mut [f32], hn: &mut [f32]) => gru_row_loop
}

/// One row of a step backward. In: the gates (z, r, n), h_{t−1}·W_hn + b_hn, h_{t−1}, ∂L/∂h_t
/// from the output and from step t + 1. Out: ∂L/∂(x·W_x) and ∂L/∂(h·W_h) `[3H]`, and the
/// direct part of ∂L/∂h_{t−1}, δh ⊙ z.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gru_back_row_loop(
    gates: &[f32],
    hn: &[f32],
    h_prev: &[f32],
    dh_out: &[f32],
    dh_next: &[f32],
    dzx: &mut [f32],
    dzh: &mut [f32],
    dh_prev: &mut [f32],
) {
    let n = dh_prev.len();
    let (gz, gr, gn) = (&gates[..n], &gates[n..2 * n], &gates[2 * n..3 * n]);
    let (hn, h_prev, dh_out, dh_next) = (&hn[..n], &h_prev[..n], &dh_out[..n], &dh_next[..n]);
    let (xz, rest) = dzx.split_at_mut(n);
    let (xr, xn) = rest.split_at_mut(n);
    let xn = &mut xn[..n];
    let (hz, rest) = dzh.split_at_mut(n);
    let (hr, hh) = rest.split_at_mut(n);
    let hh = &mut hh[..n];
    for j in 0..n {
        let (z, r, nn) = (gz[j], gr[j], gn[j]);
        let dh = dh_out[j] + dh_next[j];
        let dn = dh * (1.0 - z) * (1.0 - nn * nn);
        let dzp = dh * (h_prev[j] - nn) * (z * (1.0 - z));
        let drp = dn * hn[j] * (r * (1.0 - r));
        (xz[j], xr[j], xn[j]) = (dzp, drp, dn);
        (hz[j], hr[j], hh[j]) = (dzp, drp, dn * r);
        dh_prev[j] = dh * z;
    }
}

widest_simd! {
    /// [`gru_back_row_loop`] in the widest vector instructions the processor has.
    fn gru_back_row(
        gates: &[f32],
        hn: &[f32],
        h_prev: &[f32],
        dh_out: &[f32],
        dh_next: &[f32],
        dzx: &mut [f32],
        dzh: &mut [f32],
        dh_prev: &mut [f32]
    ) => gru_back_row_loop
}

/// The forward pass: h_1 … h_T `[T, B, H]` and what backward needs.
#[allow(clippy::too_many_arguments)]
fn gru_forward(
    d: Dims,
    x: &[f32],
    w_x: &[f32],
    w_h: &[f32],
    b_x: &[f32],
    b_h: &[f32],
    h0: &[f32],
) -> (Vec<f32>, GruSaved) {
    let Dims { t, b, i, h } = d;
    let (g3, bh) = (3 * h, b * h);
    let mut gx = broadcast_rows(b_x, t * b);
    matmul(&mut gx, t * b, g3, i, rows(x, i), rows(w_x, g3), true);
    let mut out = vec![0f32; t * bh];
    let mut hn = vec![0f32; t * bh];
    let (gxs, hs, hns) = (
        Shared::new(&mut gx),
        Shared::new(&mut out),
        Shared::new(&mut hn),
    );
    let parts = row_parts(b, h);
    let w_h = PackedRhs::new(rows(w_h, g3), h, g3, parts.len() > 1 && t > 1);
    for_parts(parts, |rr, threads| {
        let (r0, n) = (rr.start, rr.len());
        let mut gh = vec![0f32; n * g3];
        for s in 0..t {
            // SAFETY: this task alone touches rows r0..r0 + n of each step, and the parts of
            // steps s − 1 and s are disjoint.
            let (gx, h_prev, hh, hn) = unsafe {
                (
                    gxs.part((s * b + r0) * g3, n * g3),
                    match s {
                        0 => &h0[r0 * h..(r0 + n) * h],
                        _ => &*hs.part(((s - 1) * b + r0) * h, n * h),
                    },
                    hs.part((s * b + r0) * h, n * h),
                    hns.part((s * b + r0) * h, n * h),
                )
            };
            for row in gh.chunks_exact_mut(g3) {
                row.copy_from_slice(b_h);
            }
            w_h.product(&mut gh, n, h_prev, true, threads);
            for r in 0..n {
                gru_row(
                    &mut gx[r * g3..(r + 1) * g3],
                    &gh[r * g3..(r + 1) * g3],
                    &h_prev[r * h..(r + 1) * h],
                    &mut hh[r * h..(r + 1) * h],
                    &mut hn[r * h..(r + 1) * h],
                );
            }
        }
    });
    (
        out,
        GruSaved {
            gates: Arc::new(gx),
            hn: Arc::new(hn),
        },
    )
}

/// The gradients of a GRU layer.
struct GruGrads {
    w: WeightGrads,
    h0: Vec<f32>,
}

/// The backward pass, from `grad` = ∂L/∂(h_1 … h_T) `[T, B, H]`.
#[allow(clippy::too_many_arguments)]
fn gru_backward(
    d: Dims,
    x: &[f32],
    w_x: &[f32],
    w_h: &[f32],
    h0: &[f32],
    out: &[f32],
    saved: &GruSaved,
    grad: &[f32],
    need_x: bool,
) -> GruGrads {
    let Dims { t, b, h, .. } = d;
    let g3 = 3 * h;
    let (gates, hn) = (&saved.gates[..], &saved.hn[..]);
    let mut dzx = vec![0f32; t * b * g3];
    let parts = row_parts(b, h);
    let w_ht = PackedRhs::new(transposed(w_h, g3), g3, h, parts.len() > 1 && t > 1);
    let mut dzh = vec![0f32; t * b * g3];
    let (dzxs, dzhs) = (Shared::new(&mut dzx), Shared::new(&mut dzh));
    // Per part of the rows: ∂L/∂h₀.
    let ends = for_parts(parts, |rr, threads| {
        let (r0, n) = (rr.start, rr.len());
        let at = |buf, step| part_rows(buf, step, b, &rr, h);
        let mut dh_next = vec![0f32; n * h];
        let mut dh_prev = vec![0f32; n * h];
        for s in (0..t).rev() {
            let h_prev = if s == 0 {
                &h0[r0 * h..(r0 + n) * h]
            } else {
                at(out, s - 1)
            };
            let (dh_out, hn_now) = (at(grad, s), at(hn, s));
            let g_now = &gates[(s * b + r0) * g3..(s * b + r0 + n) * g3];
            // SAFETY: this task alone touches rows r0..r0 + n of each step.
            let (dzx, dzh) = unsafe {
                (
                    dzxs.part((s * b + r0) * g3, n * g3),
                    dzhs.part((s * b + r0) * g3, n * g3),
                )
            };
            for r in 0..n {
                let hs = r * h..(r + 1) * h;
                gru_back_row(
                    &g_now[r * g3..(r + 1) * g3],
                    &hn_now[hs.clone()],
                    &h_prev[hs.clone()],
                    &dh_out[hs.clone()],
                    &dh_next[hs.clone()],
                    &mut dzx[r * g3..(r + 1) * g3],
                    &mut dzh[r * g3..(r + 1) * g3],
                    &mut dh_prev[hs],
                );
            }
            // ∂L/∂h_{t−1} = δh ⊙ z + ∂L/∂(h·W_h)_t·W_hᵀ
            w_ht.product(&mut dh_prev, n, dzh, true, threads);
            std::mem::swap(&mut dh_next, &mut dh_prev);
        }
        dh_next
    });
    let dh_next = ends.concat();
    GruGrads {
        w: weight_grads(d, 3, x, w_x, h0, out, &dzx, Some(&dzh), need_x),
        h0: dh_next,
    }
}

// --- Autodiff ---------------------------------------------------------------------------

impl<C: CheckpointStrategy> RecurrentOps for Autodiff<Flex, C> {
    fn lstm_layer(
        x: FloatTensor<Self>,
        w_x: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LstmBackward;

        impl Backward<Flex, 6> for LstmBackward {
            // x, W_x, W_h, h₀, c₀ (contiguous), the output, what the forward pass kept
            type State = ([FlexTensor; 6], LstmSaved);

            fn backward(
                self,
                ops: Ops<Self::State, 6>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [n_x, n_wx, n_wh, n_b, n_h0, n_c0] = ops.parents;
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let ([x, w_x, w_h, h0, c0, out], saved) = &ops.state;
                let d = Dims::of(x, h0);
                let g = lstm_backward(
                    d,
                    f32s(x),
                    f32s(w_x),
                    f32s(w_h),
                    f32s(h0),
                    f32s(c0),
                    f32s(out),
                    saved,
                    f32s(&grad),
                    n_x.is_some(),
                );
                let (g4, bh) = (vec![4 * d.h], vec![d.b, d.h]);
                let parts = [
                    (n_x, g.w.x.map(|v| tensor(v, vec![d.t, d.b, d.i]))),
                    (n_wx, Some(tensor(g.w.w_x, vec![d.i, 4 * d.h]))),
                    (n_wh, Some(tensor(g.w.w_h, vec![d.h, 4 * d.h]))),
                    (n_b, Some(tensor(g.w.b_x, g4))),
                    (n_h0, Some(tensor(g.h0, bh.clone()))),
                    (n_c0, Some(tensor(g.c0, bh))),
                ];
                for (node, value) in parts {
                    if let (Some(node), Some(value)) = (node, value) {
                        grads.register::<Flex>(node.id, value);
                    }
                }
            }
        }

        let nodes = [
            x.node(),
            w_x.node(),
            w_h.node(),
            b.node(),
            h0.node(),
            c0.node(),
        ];
        let [x, w_x, w_h, b, h0, c0] = [x, w_x, w_h, b, h0, c0].map(|t| t.into_primitive());
        match LstmBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let d = Dims::of(&x, &h0);
                let [x, w_x, w_h, b, h0, c0] = inputs([&x, &w_x, &w_h, &b, &h0, &c0]);
                let (out, saved) = lstm_forward(
                    d,
                    f32s(&x),
                    f32s(&w_x),
                    f32s(&w_h),
                    f32s(&b),
                    f32s(&h0),
                    f32s(&c0),
                );
                let out = tensor(out, vec![d.t + 1, d.b, d.h]);
                prep.finish(([x, w_x, w_h, h0, c0, out.clone()], saved), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::lstm_layer(x, w_x, w_h, b, h0, c0)),
        }
    }

    fn gru_layer(
        x: FloatTensor<Self>,
        w_x: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_x: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GruBackward;

        impl Backward<Flex, 6> for GruBackward {
            // x, W_x, W_h, h₀ (contiguous), the output, what the forward pass kept
            type State = ([FlexTensor; 5], GruSaved);

            fn backward(
                self,
                ops: Ops<Self::State, 6>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [n_x, n_wx, n_wh, n_bx, n_bh, n_h0] = ops.parents;
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let ([x, w_x, w_h, h0, out], saved) = &ops.state;
                let d = Dims::of(x, h0);
                let g = gru_backward(
                    d,
                    f32s(x),
                    f32s(w_x),
                    f32s(w_h),
                    f32s(h0),
                    f32s(out),
                    saved,
                    f32s(&grad),
                    n_x.is_some(),
                );
                let g3 = vec![3 * d.h];
                let parts = [
                    (n_x, g.w.x.map(|v| tensor(v, vec![d.t, d.b, d.i]))),
                    (n_wx, Some(tensor(g.w.w_x, vec![d.i, 3 * d.h]))),
                    (n_wh, Some(tensor(g.w.w_h, vec![d.h, 3 * d.h]))),
                    (n_bx, Some(tensor(g.w.b_x, g3.clone()))),
                    (n_bh, g.w.b_h.map(|v| tensor(v, g3))),
                    (n_h0, Some(tensor(g.h0, vec![d.b, d.h]))),
                ];
                for (node, value) in parts {
                    if let (Some(node), Some(value)) = (node, value) {
                        grads.register::<Flex>(node.id, value);
                    }
                }
            }
        }

        let nodes = [
            x.node(),
            w_x.node(),
            w_h.node(),
            b_x.node(),
            b_h.node(),
            h0.node(),
        ];
        let [x, w_x, w_h, b_x, b_h, h0] = [x, w_x, w_h, b_x, b_h, h0].map(|t| t.into_primitive());
        match GruBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let d = Dims::of(&x, &h0);
                let [x, w_x, w_h, b_x, b_h, h0] = inputs([&x, &w_x, &w_h, &b_x, &b_h, &h0]);
                let (out, saved) = gru_forward(
                    d,
                    f32s(&x),
                    f32s(&w_x),
                    f32s(&w_h),
                    f32s(&b_x),
                    f32s(&b_h),
                    f32s(&h0),
                );
                let out = tensor(out, vec![d.t, d.b, d.h]);
                prep.finish(([x, w_x, w_h, h0, out.clone()], saved), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::gru_layer(x, w_x, w_h, b_x, b_h, h0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::tensor::{Device, Distribution};

    fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{k}]: {x} vs {y}"
            );
        }
    }

    fn random<const D: usize>(shape: [usize; D], d: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 0.5), d)
    }

    /// Values and gradients (of x, W_x, W_h, the biases, h₀ and c₀) of the fused LSTM against
    /// Burn's operations, for one step, a long sequence, one sequence and a batch that the
    /// threads share, and inputs that need no gradient.
    #[test]
    fn lstm_kernel_matches_burns_operations() {
        let d = Device::flex().autodiff();
        for (k, (t, b, i, h, x_grad)) in [
            (1, 3, 4, 5, true),
            (7, 2, 3, 4, true),
            (40, 1, 2, 3, false),
            (5, 70, 6, 130, true),
        ]
        .into_iter()
        .enumerate()
        {
            d.seed(100 + k as u64);
            let x = random([t, b, i], &d);
            let (w_x, w_h, bias) = (
                random([i, 4 * h], &d),
                random([h, 4 * h], &d),
                random([4 * h], &d),
            );
            let (h0, c0) = (random([b, h], &d), random([b, h], &d));
            let mask_h = random([t, b, h], &d);
            let mask_c = random([b, h], &d);
            let run = |fused: bool| {
                let track = |v: &Tensor<2>| v.clone().detach().require_grad();
                let xs = if x_grad {
                    x.clone().detach().require_grad()
                } else {
                    x.clone().detach()
                };
                let (wx, wh) = (track(&w_x), track(&w_h));
                let bb = bias.clone().detach().require_grad();
                let (hh, cc) = (track(&h0), track(&c0));
                let args = (
                    xs.clone(),
                    wx.clone(),
                    wh.clone(),
                    bb.clone(),
                    hh.clone(),
                    cc.clone(),
                );
                let (out, c) = if fused {
                    lstm(args.0, args.1, args.2, args.3, args.4, args.5)
                } else {
                    lstm_reference(args.0, args.1, args.2, args.3, args.4, args.5)
                };
                let values = [to_vec(out.clone()), to_vec(c.clone())].concat();
                let loss = (out * mask_h.clone()).sum() + (c * mask_c.clone()).sum();
                let g = loss.backward();
                let mut grads = vec![
                    to_vec(wx.grad(&g).unwrap()),
                    to_vec(wh.grad(&g).unwrap()),
                    to_vec(bb.grad(&g).unwrap()),
                    to_vec(hh.grad(&g).unwrap()),
                    to_vec(cc.grad(&g).unwrap()),
                ];
                if x_grad {
                    grads.push(to_vec(xs.grad(&g).unwrap()));
                } else {
                    assert!(xs.grad(&g).is_none());
                }
                (values, grads)
            };
            let (v, g) = run(true);
            let (want_v, want_g) = run(false);
            close(&format!("LSTM T={t} B={b}: values"), &v, &want_v, 1e-5);
            for (n, (a, w)) in g.iter().zip(&want_g).enumerate() {
                close(&format!("LSTM T={t} B={b}: gradient {n}"), a, w, 1e-4);
            }
        }
    }

    /// The same for the GRU (x, W_x, W_h, b_x, b_h, h₀).
    #[test]
    fn gru_kernel_matches_burns_operations() {
        let d = Device::flex().autodiff();
        for (k, (t, b, i, h)) in [(1, 3, 4, 5), (7, 2, 3, 4), (40, 1, 2, 3), (5, 70, 6, 130)]
            .into_iter()
            .enumerate()
        {
            d.seed(200 + k as u64);
            let x = random([t, b, i], &d);
            let (w_x, w_h) = (random([i, 3 * h], &d), random([h, 3 * h], &d));
            let (b_x, b_h) = (random([3 * h], &d), random([3 * h], &d));
            let h0 = random([b, h], &d);
            let mask = random([t, b, h], &d);
            let run = |fused: bool| {
                let t2 = |v: &Tensor<2>| v.clone().detach().require_grad();
                let t1 = |v: &Tensor<1>| v.clone().detach().require_grad();
                let xs = x.clone().detach().require_grad();
                let (wx, wh, bx, bh, hh) = (t2(&w_x), t2(&w_h), t1(&b_x), t1(&b_h), t2(&h0));
                let args = (
                    xs.clone(),
                    wx.clone(),
                    wh.clone(),
                    bx.clone(),
                    bh.clone(),
                    hh.clone(),
                );
                let out = if fused {
                    gru(args.0, args.1, args.2, args.3, args.4, args.5)
                } else {
                    gru_reference(args.0, args.1, args.2, args.3, args.4, args.5)
                };
                let values = to_vec(out.clone());
                let g = (out * mask.clone()).sum().backward();
                let grads = vec![
                    to_vec(xs.grad(&g).unwrap()),
                    to_vec(wx.grad(&g).unwrap()),
                    to_vec(wh.grad(&g).unwrap()),
                    to_vec(bx.grad(&g).unwrap()),
                    to_vec(bh.grad(&g).unwrap()),
                    to_vec(hh.grad(&g).unwrap()),
                ];
                (values, grads)
            };
            let (v, g) = run(true);
            let (want_v, want_g) = run(false);
            close(&format!("GRU T={t} B={b}: values"), &v, &want_v, 1e-5);
            for (n, (a, w)) in g.iter().zip(&want_g).enumerate() {
                close(&format!("GRU T={t} B={b}: gradient {n}"), a, w, 1e-4);
            }
        }
    }

    /// Without autodiff (sampling), the fused layers give the same values.
    #[test]
    fn inference_path_matches() {
        let d = Device::flex();
        d.seed(7);
        let (t, b, i, h) = (6, 2, 3, 4);
        let x = random([t, b, i], &d);
        let (w4, u4, b4) = (
            random([i, 4 * h], &d),
            random([h, 4 * h], &d),
            random([4 * h], &d),
        );
        let (h0, c0) = (random([b, h], &d), random([b, h], &d));
        let (a, c) = lstm(
            x.clone(),
            w4.clone(),
            u4.clone(),
            b4.clone(),
            h0.clone(),
            c0.clone(),
        );
        let (want, want_c) = lstm_reference(x.clone(), w4, u4, b4, h0.clone(), c0);
        close("LSTM", &to_vec(a), &to_vec(want), 2e-6);
        close("LSTM c_T", &to_vec(c), &to_vec(want_c), 2e-6);
        let (w3, u3) = (random([i, 3 * h], &d), random([h, 3 * h], &d));
        let (bx, bh) = (random([3 * h], &d), random([3 * h], &d));
        let a = gru(
            x.clone(),
            w3.clone(),
            u3.clone(),
            bx.clone(),
            bh.clone(),
            h0.clone(),
        );
        let want = gru_reference(x, w3, u3, bx, bh, h0);
        close("GRU", &to_vec(a), &to_vec(want), 2e-6);
    }

    /// The vectorised tanh against the library's, from −20 to 20.
    #[test]
    fn tanh_matches_the_library() {
        let mut worst = 0f32;
        for k in 0..=400_000 {
            let x = -20.0 + k as f32 / 10_000.0;
            worst = worst.max((tanh(x) - x.tanh()).abs());
        }
        assert!(worst < 1.2e-7, "{worst}");
        assert_eq!(tanh(0.0), 0.0);
        assert!(tanh(f32::NAN).is_nan());
    }
}
