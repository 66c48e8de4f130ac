//! Operations every family shares, written as flex kernels where Burn's general operations
//! leave time on the table (a Burn backend extension, `#[backend_extension(Flex)]`). Each has
//! a Burn-ops path that every other backend takes, and a unit test that the two agree.
//! The CNN's kernels are beside these, in [`crate::conv`].
//!
//! # The Adam step in one pass
//!
//! Burn's Adam computes, per parameter tensor, with gradient g, moments m and v, step t:
//!
//! m ← β₁·m + (1 − β₁)·g,  v ← β₂·v + (1 − β₂)·g²,
//! θ ← θ − η · (m·c) / (√v + ε·√(1 − β₂ᵗ)),  c = √(1 − β₂ᵗ) / (1 − β₁ᵗ)
//!
//! (the bias-corrected m̂/(√v̂ + ε) rewritten with one scale factor c). With Burn's operations
//! that is thirteen element-wise passes, each reading and writing whole parameter-sized
//! tensors; for the VAE's 650,000 parameters at every batch they cost about as much as its
//! matrix products. [`adam_step`] does it in one pass that reads θ, g, m, v and writes θ, m,
//! v, in the same floating-point operations in the same order, so the results are Burn's to
//! the bit.
//!
//! # Binary cross-entropy from logits, summed per row
//!
//! BCE(x, l) = Σ_d [softplus(l_d) − x_d·l_d], softplus(l) = max(l, 0) + ln(1 + e^{−|l|}),
//! with ∂BCE/∂l_d = σ(l_d) − x_d. Burn's operations take six passes forward and as many
//! backward over `[batch, D]` tensors, with the logarithm and exponential one element at a
//! time on one core; [`bce_with_logits_rows`] is one pass each way, rows shared among threads,
//! with e^x and ln(1 + e) written as polynomials that the compiler turns into vector
//! instructions (the C library's `expf` and `log1pf` took a fifth of a VAE batch).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::packed::BLOCKED_MIN_ROWS;

#[backend_extension(Flex)]
pub trait SharedOps: Backend {
    /// One Adam step of a parameter tensor given flat: `[n]` θ, g, m, v → `[3n]` θ', m', v'
    /// side by side. `k` = [β₁, β₂, 1 − β₁, 1 − β₂, c, ε·√(1 − β₂ᵗ), η].
    fn adam_packed(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k: [f32; 7],
    ) -> FloatTensor<Self>;
}

#[backend_extension(Flex, Autodiff)]
pub trait LossOps: Backend {
    /// `[b, d]` logits l and targets x → `[b, 1]`: Σ_d softplus(l) − x·l per row. Only the
    /// logits are differentiated.
    fn bce_with_logits_rows(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// BCE(x, l) = Σ_d [softplus(l_d) − x_d·l_d] for each row: `[batch, D]` logits and targets in
/// [0, 1] → `[batch]`. On flex, one fused kernel (forward and backward); elsewhere, or when
/// the targets need a gradient too, [`bce_with_logits_rows_reference`].
pub fn bce_with_logits_rows(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    if !(on_flex_f32(&logits) && on_flex_f32(&targets)) || targets.is_require_grad() {
        return bce_with_logits_rows_reference(logits, targets);
    }
    let rows: Tensor<2> = Tensor::from_dispatch(<Dispatch as LossOps>::bce_with_logits_rows(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ));
    rows.squeeze_dim(1)
}

/// The same with Burn's operations: softplus(l) computed as −log σ(−l).
pub fn bce_with_logits_rows_reference(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    (log_sigmoid(logits.clone().neg()).neg() - targets * logits)
        .sum_dim(1)
        .squeeze_dim(1)
}

/// Whether `x` lives on flex as f32 (where the kernels here apply).
pub fn on_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(
        x.device().as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    ) && x.dtype() == DType::F32
}

/// Adam's coefficients for step `t` (1 for the first), as [`SharedOps::adam_packed`] takes
/// them, computed as Burn computes them.
pub fn adam_coefficients(beta1: f32, beta2: f32, epsilon: f32, t: usize, lr: f64) -> [f32; 7] {
    let t = t as i32;
    let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
    let combined = bias_correction2_sqrt / (1.0 - beta1.powi(t));
    [
        beta1,
        beta2,
        1.0 - beta1,
        1.0 - beta2,
        combined,
        epsilon * bias_correction2_sqrt,
        lr as f32,
    ]
}

/// One Adam step on flex: `(θ', m', v')` from θ, g and the moments (zeros before the first
/// step, which makes m' = (1 − β₁)·g exactly as Burn's first step). The caller checks
/// [`on_flex_f32`].
pub fn adam_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    k: [f32; 7],
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let shape = param.shape();
    let n = shape.num_elements();
    let flat = |t: Tensor<D>| t.reshape([n]).into_dispatch();
    let packed: Tensor<1> = Tensor::from_dispatch(<Dispatch as SharedOps>::adam_packed(
        flat(param),
        flat(grad),
        flat(m),
        flat(v),
        k,
    ));
    let part = |i: usize| packed.clone().narrow(0, i * n, n).reshape(shape.clone());
    (part(0), part(1), part(2))
}

/// Elements per rayon task: small parameter tensors stay on the calling thread.
const CHUNK: usize = 1 << 16;

impl SharedOps for Flex {
    /// In steady state θ, m and v are the three thirds of the buffer the previous step
    /// returned, owned by nobody else: the step then overwrites that buffer in place (no
    /// allocation). Otherwise (the first step, or a buffer shared with a checkpoint or a
    /// replica) they are copied side by side into a new buffer first.
    fn adam_packed(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        k: [f32; 7],
    ) -> FlexTensor {
        let n = param.layout().num_elements();
        let grad = contiguous(&grad);
        let mut packed = match previous_packed(param, m, v, n) {
            Ok(packed) => packed,
            Err((param, m, v)) => {
                let mut out = Vec::with_capacity(3 * n);
                for t in [param, m, v] {
                    out.extend_from_slice(f32s(&contiguous(&t)));
                }
                FlexTensor::from_data(TensorData::new(out, vec![3 * n]))
            }
        };
        let buf = packed
            .try_storage_mut::<f32>()
            .expect("a packed Adam buffer is owned by the step that updates it");
        let (po, rest) = buf.split_at_mut(n);
        let (mo, vo) = rest.split_at_mut(n);
        adam_in_place(po, mo, vo, f32s(&grad), k);
        packed
    }
}

/// The buffer `[3n]` = [θ | m | v] that θ, m and v view, if they are exactly its three
/// thirds and nothing else holds it; otherwise the three tensors back.
#[allow(clippy::result_large_err)]
fn previous_packed(
    param: FlexTensor,
    m: FlexTensor,
    v: FlexTensor,
    n: usize,
) -> Result<FlexTensor, (FlexTensor, FlexTensor, FlexTensor)> {
    let arc = param.data_arc();
    let thirds = [&param, &m, &v].iter().enumerate().all(|(i, t)| {
        t.dtype() == DType::F32
            && std::sync::Arc::ptr_eq(&t.data_arc(), &arc)
            && t.layout().contiguous_offsets() == Some((i * n, (i + 1) * n))
    }) && arc.len() == 3 * n * std::mem::size_of::<f32>();
    if !thirds {
        return Err((param, m, v));
    }
    drop((param, m, v));
    let packed = FlexTensor::from_arc(
        arc,
        burn::backend::flex::Layout::contiguous(burn::tensor::Shape::new([3 * n])),
        DType::F32,
    );
    if packed.is_unique() {
        Ok(packed)
    } else {
        let part = |i: usize| packed.narrow(0, i * n, n);
        Err((part(0), part(1), part(2)))
    }
}

/// m ← β₁·m + (1 − β₁)·g, v ← β₂·v + (1 − β₂)·g², θ ← θ − η·(m·c)/(√v + ε′), element by
/// element, in Burn's order of operations; large tensors split among threads.
fn adam_in_place(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: [f32; 7]) {
    if p.len() <= CHUNK {
        adam_chunk(p, m, v, g, k);
    } else {
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| adam_chunk(p, m, v, g, k));
    }
}

widest_simd! {
    /// One thread's share of [`adam_in_place`], in the widest vector instructions the
    /// processor has. Separate multiplies and adds either way (Rust never fuses them), so the
    /// results do not depend on the instruction set.
    fn adam_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: [f32; 7]) => adam_loop
}

#[inline(always)]
fn adam_loop(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: [f32; 7]) {
    let [b1, b2, c1, c2, combined, eps, lr] = k;
    let n = p.len().min(m.len()).min(v.len()).min(g.len());
    let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        let gi = g[i];
        let mi = m[i] * b1 + gi * c1;
        let vi = v[i] * b2 + (gi * gi) * c2;
        let u = (mi * combined) / (vi.sqrt() + eps);
        p[i] -= u * lr;
        m[i] = mi;
        v[i] = vi;
    }
}

/// e^x for x ≤ 0 in operations that vectorize (no table, no branch, no library call):
/// x = n·ln 2 + r with n = round(x·log₂e) and |r| ≤ ½ ln 2, e^r from Cephes' `expf`
/// polynomial, and 2^n written into the exponent bits. x is clamped at −87 (e^−87 ≈ 1.6·10⁻³⁸),
/// so 2^n stays a normal number (a NaN stays NaN). Within 2·10⁻⁷ of e^x, relatively (unit
/// test).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in any instruction set.
    const ROUND: f32 = 12_582_912.0;
    // Not `x.max(−87)`, which would turn a NaN into −87 and hide it from the NaN stop.
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // r = x − n·ln 2, with ln 2 split in two (Cody and Waite) so that n·ln2_hi is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = p * r + c;
    }
    let e_r = p * (r * r) + r + 1.0;
    // 2^n from the integer n that `shifted` holds in its low mantissa bits (n + 1.5·2²³ has
    // the exponent of 2²³): integer operations only, where `n as i32` (a saturating
    // conversion) kept the compiler from vectorising the loops that call this.
    let bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(bits.wrapping_add(127) << 23)
}

/// ln(1 + e) for e ∈ [0, 1]: with s = e / (2 + e) ∈ [0, ⅓], 1 + e = (1 + s)/(1 − s) and
/// ln(1 + e) = 2·(s + s³/3 + s⁵/5 + … + s¹³/13); the terms left out sum to less than 10⁻⁸.
/// Accurate for tiny e too (≈ 2s ≈ e), unlike ln of the rounded 1 + e.
#[inline(always)]
fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    let mut q = 1.0f32 / 13.0;
    for c in [1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
        q = q * s2 + c;
    }
    2.0 * s * q
}

/// softplus(l) = ln(1 + e^l) = max(l, 0) + ln(1 + e^{−|l|}), without overflow for large l.
#[inline(always)]
fn softplus(l: f32) -> f32 {
    l.max(0.0) + ln_1p_unit(exp_nonpositive(-l.abs()))
}

/// σ(l) = 1 / (1 + e^{−l}); with e = e^{−|l|}: 1/(1 + e) for l ≥ 0, e/(1 + e) below, so
/// nothing overflows.
#[inline(always)]
pub(crate) fn sigmoid(l: f32) -> f32 {
    let e = exp_nonpositive(-l.abs());
    let p = 1.0 / (1.0 + e);
    if l >= 0.0 { p } else { e * p }
}

/// Lanes of the row sums: 16 running f64 sums, added in a fixed order, so the result is the
/// same bits whichever instruction set computes it.
const LANES: usize = 16;

/// Σ_d softplus(l_d) − x_d·l_d of one row.
#[inline(always)]
fn bce_row_loop(l: &[f32], x: &[f32]) -> f64 {
    let n = l.len().min(x.len());
    let (l, x) = (&l[..n], &x[..n]);
    let mut acc = [0f64; LANES];
    for (l, x) in l.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        let (l, x): (&[f32; LANES], &[f32; LANES]) = (l.try_into().unwrap(), x.try_into().unwrap());
        for j in 0..LANES {
            acc[j] += (softplus(l[j]) - x[j] * l[j]) as f64;
        }
    }
    let tail = n - n % LANES;
    let mut sum: f64 = acc.iter().sum();
    for (&l, &x) in l[tail..].iter().zip(&x[tail..]) {
        sum += (softplus(l) - x * l) as f64;
    }
    sum
}

/// out_d = g·(σ(l_d) − x_d) for one row.
#[inline(always)]
fn bce_grad_row_loop(g: f32, l: &[f32], x: &[f32], out: &mut [f32]) {
    for ((o, &l), &x) in out.iter_mut().zip(l).zip(x) {
        *o = g * (sigmoid(l) - x);
    }
}

widest_simd! {
    /// [`bce_row_loop`] in the widest vector instructions the processor has.
    fn bce_row(l: &[f32], x: &[f32]) -> f64 => bce_row_loop
}

widest_simd! {
    /// [`bce_grad_row_loop`] in the widest vector instructions the processor has.
    fn bce_grad_row(g: f32, l: &[f32], x: &[f32], out: &mut [f32]) => bce_grad_row_loop
}

fn shape2(t: &FlexTensor) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

impl LossOps for Flex {
    fn bce_with_logits_rows(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let [b, d] = shape2(&logits);
        let (logits, targets) = (contiguous(&logits), contiguous(&targets));
        let (l, x) = (f32s(&logits), f32s(&targets));
        let rows: Vec<f32> = (0..b)
            .into_par_iter()
            .map(|r| bce_row(&l[r * d..(r + 1) * d], &x[r * d..(r + 1) * d]) as f32)
            .collect();
        FlexTensor::from_data(TensorData::new(rows, vec![b, 1]))
    }
}

/// ∂L/∂l[r, j] = ∂L/∂BCE_r · (σ(l[r, j]) − x[r, j]).
fn bce_backward(logits: &FlexTensor, targets: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let [b, d] = shape2(logits);
    let (logits, targets, grad) = (contiguous(logits), contiguous(targets), contiguous(grad));
    let (l, x, g) = (f32s(&logits), f32s(&targets), f32s(&grad));
    let mut dl = vec![0.0f32; b * d];
    dl.par_chunks_mut(d).enumerate().for_each(|(r, out)| {
        bce_grad_row(g[r], &l[r * d..(r + 1) * d], &x[r * d..(r + 1) * d], out);
    });
    FlexTensor::from_data(TensorData::new(dl, vec![b, d]))
}

impl<C: CheckpointStrategy> LossOps for Autodiff<Flex, C> {
    fn bce_with_logits_rows(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The targets carry no gradient: the operation is one of the logits.
        let x = targets.into_primitive();
        let y = x.clone();
        unary_with_backward::<C, _>(
            logits,
            |l| Flex::bce_with_logits_rows(l, y),
            move |l, g| bce_backward(l, &x, g),
        )
    }
}

/// The autodiff side of a flex operation of one input whose backward pass needs only that
/// input (and constants the closures hold): out = `forward(x)`, ∂L/∂x = `backward(x,
/// ∂L/∂out)` (BCE with logits here, the pool → ReLU of [`crate::conv`], GELU and LeakyReLU of
/// [`crate::activation`]).
pub(crate) fn unary_with_backward<C: CheckpointStrategy, B>(
    x: FloatTensor<Autodiff<Flex, C>>,
    forward: impl FnOnce(FlexTensor) -> FlexTensor,
    backward: B,
) -> FloatTensor<Autodiff<Flex, C>>
where
    B: Fn(&FlexTensor, &FlexTensor) -> FlexTensor + Send + Sync + 'static,
{
    struct UnaryBackward<B>(B);

    impl<B> std::fmt::Debug for UnaryBackward<B> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("UnaryBackward")
        }
    }

    impl<B> Backward<Flex, 1> for UnaryBackward<B>
    where
        B: Fn(&FlexTensor, &FlexTensor) -> FlexTensor + Send + Sync + 'static,
    {
        type State = FlexTensor;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            if let Some(node) = node_x {
                grads.register::<Flex>(node.id, (self.0)(&ops.state, &grad));
            }
        }
    }

    let nodes = [x.node()];
    let x = x.into_primitive();
    match UnaryBackward(backward)
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = forward(x.clone());
            prep.finish(x, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x)),
    }
}

/// A matrix as strides over a slice: element (r, c) at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

/// A row-major matrix with `cols` columns.
pub(crate) fn rows(data: &[f32], cols: usize) -> View<'_> {
    View {
        data,
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a row-major matrix with `cols` columns.
pub(crate) fn transposed(data: &[f32], cols: usize) -> View<'_> {
    View {
        data,
        rs: 1,
        cs: cols,
    }
}

/// out `[m, n]` (row-major) = a `[m, k]` · b `[k, n]`, added to out's values when
/// `accumulate`: the product of flex itself (the `gemm` crate), on the calling thread alone or
/// on all threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    accumulate: bool,
    threads: bool,
) {
    product_into(out, n, m, n, k, a, b, accumulate, threads);
}

/// [`product`] into rows `out_rs` apart (a block of columns of a wider matrix).
#[allow(clippy::too_many_arguments)]
pub(crate) fn product_into(
    out: &mut [f32],
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    accumulate: bool,
    threads: bool,
) {
    // SAFETY: MaybeUninit<f32> has f32's layout, the values are initialised (read when
    // accumulating), and only f32 values are written back.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    checked_product(out, out_rs, m, n, k, a, b, accumulate, threads);
}

/// out `[m, n]` (rows `out_rs` apart) = a `[m, k]` · b `[k, n]` into memory not yet
/// initialised, on the calling thread: every one of the m·n values is written (zeros when
/// k = 0), none read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product_uninit(
    out: &mut [MaybeUninit<f32>],
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
) {
    checked_product(out, out_rs, m, n, k, a, b, false, false);
}

/// [`product_into`] and [`product_uninit`]: out's extent checked, k = 0 written as zeros (or
/// left as it is, when accumulating); out is read only when `accumulate`, and then the caller
/// has initialised it.
#[allow(clippy::too_many_arguments)]
fn checked_product(
    out: &mut [MaybeUninit<f32>],
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    accumulate: bool,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= out_rs && (m - 1) * out_rs + n <= out.len());
    if k == 0 {
        if !accumulate {
            for row in out.chunks_mut(out_rs).take(m) {
                fill_uninit(&mut row[..n], 0.0);
            }
        }
        return;
    }
    // SAFETY: out holds rows up to (m − 1)·out_rs + n (checked above), is read only when
    // accumulating (initialised then: the callers' promise), and does not alias a or b (a
    // mutable and two shared borrows).
    let out = out.as_mut_ptr().cast();
    unsafe { gemm_raw(out, out_rs, m, n, k, a, b, accumulate, threads) };
}

/// The `gemm` crate's product into `out` (rows `out_rs` apart), reading out only when
/// `accumulate`; k ≥ 1.
///
/// # Safety
/// `out` is valid for writes (and reads, when `accumulate`) of m rows of n values `out_rs`
/// apart, and overlaps neither a nor b.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    out: *mut f32,
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    accumulate: bool,
    threads: bool,
) {
    // Every element the product reads lies inside its slice.
    assert!((m - 1) * a.rs + (k - 1) * a.cs < a.data.len());
    assert!((k - 1) * b.rs + (n - 1) * b.cs < b.data.len());
    let parallelism = if threads {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the two views' extents were checked above, out's are the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// a `[m, k]` · b `[k, n]` as a new row-major `[m, n]` buffer, which the product writes
/// without reading: no zero fill first (for the large outputs of a layer, the fill was a pass
/// over memory as long as the product's own writes).
pub(crate) fn new_product(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    threads: bool,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    // SAFETY: with accumulate = false the product reads none of the new buffer and writes all
    // m·n values (rows n apart); a new buffer aliases neither a nor b.
    unsafe {
        written_in_full(m * n, |out| {
            gemm_raw(out.as_mut_ptr().cast(), n, m, n, k, a, b, false, threads)
        })
    }
}

/// A new buffer of `len` values, each written by `write` (given the buffer's `len` values, not
/// yet initialised) — with no zero fill first.
///
/// # Safety
/// `write` writes every one of the `len` values and reads none it has not written.
pub(crate) unsafe fn written_in_full(
    len: usize,
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    write(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: room for len values, all initialised by `write` (the caller's promise).
    unsafe { out.set_len(len) };
    out
}

/// Every value of `dst` set to `value`: the slice, now initialised.
#[inline(always)]
pub(crate) fn fill_uninit(dst: &mut [MaybeUninit<f32>], value: f32) -> &mut [f32] {
    for v in dst.iter_mut() {
        v.write(value);
    }
    // SAFETY: every value was written just above.
    unsafe { dst.assume_init_mut() }
}

/// Whether an [m, k]·[k, n] product runs on all threads by flex's own rule (from 192³
/// multiply-adds): a kernel that calls [`product`] where Burn would call flex's matmul uses it
/// to keep the gemm crate's blocking, and so Burn's results to the bit.
pub(crate) fn flex_threads(m: usize, n: usize, k: usize) -> bool {
    m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192
}

/// a `[m, k]` · b `[k, n]` as a new row-major `[m, n]` buffer, threaded by [`flex_threads`]:
/// what flex's matmul computes, without its realigning copy — except for deep products
/// (k ≥ [`DEEP_PRODUCT`], at least [`BLOCKED_MIN_ROWS`] rows), which kiln's blocked product
/// computes, and products of many rows (m ≥ [`ROW_BLOCKED_MIN_ROWS`]), computed in blocks of
/// [`ROW_BLOCK`] rows, each on one thread (both equal to rounding).
pub(crate) fn flex_product(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f32> {
    flex_product_then(m, n, k, a, b, |_| {})
}

/// [`flex_product`], then `then` applied to blocks of whole rows of the result — for the
/// row-blocked product, to each block right after its product wrote it, while it is in the
/// cache (a dense layer adds its bias so: a pass over the output from memory less).
pub(crate) fn flex_product_then(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    then: impl Fn(&mut [f32]) + Send + Sync,
) -> Vec<f32> {
    let mut y = if k >= DEEP_PRODUCT && m >= BLOCKED_MIN_ROWS {
        crate::packed::new_large_product(m, n, k, a, b)
    } else if m < ROW_BLOCKED_MIN_ROWS || n == 0 {
        new_product(m, n, k, a, b, flex_threads(m, n, k))
    } else {
        let blocks = |y: &mut [MaybeUninit<f32>]| {
            y.par_chunks_mut(ROW_BLOCK * n)
                .enumerate()
                .for_each(|(block, out)| {
                    let a = View {
                        data: &a.data[block * ROW_BLOCK * a.rs..],
                        ..a
                    };
                    product_uninit(out, n, out.len() / n, n, k, a, b);
                    // SAFETY: the product wrote all of the block's rows (every value of `out`).
                    then(unsafe { out.assume_init_mut() });
                })
        };
        // SAFETY: the blocks cover all m rows, each written in full by its product.
        return unsafe { written_in_full(m * n, blocks) };
    };
    then(&mut y);
    y
}

/// From this many rows on, [`flex_product_then`] splits a shallow product into blocks of
/// [`ROW_BLOCK`] rows, one task each (the Transformer's 16·128 positions): the `gemm` crate's
/// own threading of such a product left both threads waiting on each other, and the block's
/// result is still in the cache for what follows it.
const ROW_BLOCKED_MIN_ROWS: usize = 1024;

/// Rows of a block of [`flex_product_then`].
const ROW_BLOCK: usize = 256;

/// From this depth on, [`flex_product`] runs kiln's blocked product
/// ([`crate::packed::large_product`]): a weight gradient Xᵀ·G summed over the rows of a large
/// batch (a Transformer's 16·128 positions), 1.3–1.6× faster there than the `gemm` crate,
/// measured inside a training step; shallower products stay with flex's own.
const DEEP_PRODUCT: usize = 1024;

/// A flex tensor of `shape` holding `values`.
pub(crate) fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `t` itself if its values are one contiguous f32 run (a view with an offset is fine),
/// else a contiguous copy.
pub fn contiguous(t: &FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous f32 tensor (see [`contiguous`]).
pub fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("kiln's flex operations only send contiguous f32 tensors to their kernels")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::tensor::{Device, Distribution};

    /// The fused BCE gives Burn's operations' value and gradient, for logits from −30 to 30
    /// (where a naive ln(1 + e^l) overflows) and targets strictly between 0 and 1.
    #[test]
    fn bce_kernel_matches_burns_operations() {
        let d = Device::flex().autodiff();
        d.seed(21);
        let l0 = Tensor::<2>::random([7, 50], Distribution::Uniform(-30.0, 30.0), &d);
        let x = Tensor::<2>::random([7, 50], Distribution::Uniform(0.0, 1.0), &d);
        let w = Tensor::<1>::random([7], Distribution::Uniform(0.5, 2.0), &d);
        let run = |f: fn(Tensor<2>, Tensor<2>) -> Tensor<1>| {
            let l = l0.clone().detach().require_grad();
            let rows = f(l.clone(), x.clone());
            let grads = (rows.clone() * w.clone()).sum().backward();
            (to_vec(rows), to_vec(l.grad(&grads).unwrap()))
        };
        let (rows, grad) = run(bce_with_logits_rows);
        let (want_rows, want_grad) = run(bce_with_logits_rows_reference);
        for (a, b) in rows.iter().zip(&want_rows) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        for (a, b) in grad.iter().zip(&want_grad) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
        // By hand: l = 0, x = 1 → ln 2; l = 2, x = 0.25 → softplus(2) − 0.5.
        let l = Tensor::<2>::from_floats([[0.0, 2.0]], &d);
        let x = Tensor::<2>::from_floats([[1.0, 0.25]], &d);
        let want = 2f32.ln() + (1.0 + 2f32.exp()).ln() - 0.5;
        let got = bce_with_logits_rows(l, x).into_scalar::<f32>();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// The polynomial e^x, softplus and σ against the C library's in f64, from −100 to 100:
    /// within 3·10⁻⁷ relatively (two units in the last place), and NaN stays NaN.
    #[test]
    fn vectorised_exp_softplus_and_sigmoid_match_the_library() {
        let mut worst = [0f64; 3];
        for i in 0..=400_000 {
            let l = -100.0 + i as f32 / 2000.0;
            let lf = l as f64;
            let want = [
                lf.exp(),
                lf.max(0.0) + (-lf.abs()).exp().ln_1p(),
                1.0 / (1.0 + (-lf).exp()),
            ];
            let got = [exp_nonpositive(l.min(0.0)), softplus(l), sigmoid(l)];
            for k in 0..3 {
                let w = if k == 0 { lf.min(0.0).exp() } else { want[k] };
                // Below e^−87 the clamp answers e^−87 instead of a subnormal: not compared.
                if w > 1e-37 {
                    worst[k] = worst[k].max((got[k] as f64 - w).abs() / w);
                }
            }
        }
        assert!(worst.iter().all(|&e| e < 3e-7), "relative errors {worst:?}");
        assert_eq!(softplus(0.0), 2f32.ln());
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(softplus(f32::INFINITY), f32::INFINITY);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        // e^−87 rather than 0: the clamp that keeps 2^n normal.
        assert!((0.0..1e-37).contains(&sigmoid(f32::NEG_INFINITY)));
        assert!(softplus(f32::NAN).is_nan() && sigmoid(f32::NAN).is_nan());
        assert!(bce_row(&[0.5, f32::NAN], &[1.0, 0.0]).is_nan());
    }

    /// 2^n read from the rounding sum's mantissa bits equals the scaling by `n as i32`
    /// (a saturating conversion the compiler did not vectorise) to the bit, over [−87, 0].
    #[test]
    fn exp_scale_from_the_mantissa_bits_is_the_integer_scale() {
        const ROUND: f32 = 12_582_912.0;
        for i in 0..=870_000 {
            let x = -(i as f32) / 10_000.0;
            let shifted = x * std::f32::consts::LOG2_E + ROUND;
            let n = shifted - ROUND;
            let bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
            assert_eq!(
                bits.wrapping_add(127) << 23,
                ((n as i32 + 127) as u32) << 23,
                "x = {x}"
            );
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// The product written into a new buffer (no zero fill) is the accumulating product's
    /// into zeros, to the bit, threaded and not, and for empty shapes.
    #[test]
    fn new_product_equals_the_product_into_zeros() {
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (300, 200, 150), (0, 4, 3), (3, 4, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.25 - 1.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 * 0.5 - 2.0).collect();
            for threads in [false, true] {
                let mut want = vec![0f32; m * n];
                product(&mut want, m, n, k, rows(&a, k), rows(&b, n), true, threads);
                let got = new_product(m, n, k, rows(&a, k), rows(&b, n), threads);
                assert_eq!(got, want, "{m}×{k}·{k}×{n}, threads {threads}");
            }
        }
    }

    /// The row sum and the gradient row give the same bits in every instruction set (the
    /// portable loop and the AVX-512 or AVX2 build chosen at run time), for a row with a tail.
    #[test]
    fn bce_rows_do_not_depend_on_the_instruction_set() {
        let l: Vec<f32> = (0..789)
            .map(|i| ((i * 7919) % 2001) as f32 / 50.0 - 20.0)
            .collect();
        let x: Vec<f32> = (0..789).map(|i| (i % 7) as f32 / 6.0).collect();
        assert_eq!(bce_row(&l, &x).to_bits(), bce_row_loop(&l, &x).to_bits());
        let (mut a, mut b) = (vec![0f32; 789], vec![0f32; 789]);
        bce_grad_row(0.7, &l, &x, &mut a);
        bce_grad_row_loop(0.7, &l, &x, &mut b);
        assert_eq!(a, b);
        let by_term: f64 = l
            .iter()
            .zip(&x)
            .map(|(&l, &x)| (softplus(l) - x * l) as f64)
            .sum();
        assert!((bce_row(&l, &x) - by_term).abs() < 1e-9 * by_term.abs());
    }

    /// One step of the packed kernel against the formula written out for a few values,
    /// including the first step (zero moments) and a parameter view that is not contiguous.
    #[test]
    fn adam_step_follows_the_formula() {
        let d = Device::flex();
        let p = Tensor::<2>::from_floats([[1.0, -2.0], [0.5, 3.0]], &d).transpose();
        let g = Tensor::<2>::from_floats([[0.1, -0.3], [2.0, 0.0]], &d).transpose();
        let (b1, b2, eps, lr) = (0.9f32, 0.999f32, 1e-8f32, 0.01f64);
        let k = adam_coefficients(b1, b2, eps, 1, lr);
        let (theta, m, v) = adam_step(p.clone(), g.clone(), g.zeros_like(), g.zeros_like(), k);
        assert_eq!(theta.dims(), [2, 2]);
        for (((t, m), v), (p, g)) in to_vec(theta)
            .into_iter()
            .zip(to_vec(m))
            .zip(to_vec(v))
            .zip(to_vec(p).into_iter().zip(to_vec(g)))
        {
            let (m_hat, v_hat) = (m / (1.0 - b1), v / (1.0 - b2));
            assert!((m - (1.0 - b1) * g).abs() < 1e-7);
            assert!((v - (1.0 - b2) * g * g).abs() < 1e-9);
            let want = p - lr as f32 * m_hat / (v_hat.sqrt() + eps);
            assert!((t - want).abs() < 1e-6, "{t} vs {want}");
        }
    }
}
