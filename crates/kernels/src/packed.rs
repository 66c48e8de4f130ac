//! Matrix products on a register kernel of kiln's own, where the `gemm` crate (flex's product)
//! leaves time: a product repeated with the same right-hand side, and the large products of a
//! recurrent layer.
//!
//! A general product (the `gemm` crate, PyTorch's MKL) copies ("packs") the right-hand side B
//! into the order its inner loop reads at every call. A recurrence's h_{t−1}·W_h at each of its
//! T steps (and ∂L/∂z_t·W_hᵀ backward) always has the same W_h: [`PackedRhs`] packs it once per
//! sequence, into panels of [`NR`] = 32 columns, each panel k rows of 32 adjacent values:
//!
//! panel p = [B_{κ, 32p + j}] for κ = 0…k−1, j = 0…31 (zero past the last column),
//!
//! and its product computes C_{i, 32p + j} (+)= Σ_κ A_{i, κ}·B_{κ, 32p + j} for [`MR`] = 12
//! rows i at a time: per κ, two vector loads of the panel's row and one broadcast of A_{i, κ}
//! per row (A's rows interleaved first, so that the 12 values of step κ lie side by side), 24
//! fused multiply-adds into 24 registers that hold the 12 × 32 block of C until κ ends.
//!
//! [`large_product`] runs the same kernel on a layer's products over all T·B rows (the input
//! projection X·W_x, the weight gradients Xᵀ·∂L/∂Z and H_prevᵀ·∂L/∂Z, ∂L/∂X), blocked as BLIS
//! does: B packed KC rows at a time, A MC rows at a time, the threads sharing the columns (or
//! the rows). Measured inside an LSTM training step on a 2-core AVX-512 machine: the weight
//! gradient `[256, 6336]·[6336, 1024]` 10.0 against the `gemm` crate's 11.8 ms, the input
//! projection `[6400, 256]·[256, 1024]` 10.9 against 13.4 ms, `[64, 6400]·[6400, 1024]` 3.4
//! against 7.4 ms (the `gemm` crate stays ahead for ∂L/∂X, `[6400, 1024]·[1024, 256]`: 9.9
//! against 8.8 ms).
//!
//! With AVX-512 these are what the products run; on other processors (and when a step's
//! product shares the threads) the `gemm` crate.

use rayon::prelude::*;

use crate::ops::{View, product, rows, written_in_full};

/// Columns per panel: two AVX-512 vectors of f32.
const NR: usize = 32;
/// Rows of C per block: 2·12 accumulators, 2 panel vectors and a broadcast fit the 32 registers.
const MR: usize = 12;

/// B `[k, n]` ready for many products A·B on the calling thread.
pub(crate) struct PackedRhs<'a> {
    b: View<'a>,
    k: usize,
    n: usize,
    /// The panels, when the processor runs the packed product (AVX-512).
    panels: Option<Vec<f32>>,
}

impl<'a> PackedRhs<'a> {
    /// Packs `b` `[k, n]` (any strides) when `worth` it (many products on the calling thread)
    /// and the processor has AVX-512; else keeps the view for the `gemm` crate.
    pub(crate) fn new(b: View<'a>, k: usize, n: usize, worth: bool) -> PackedRhs<'a> {
        let panels = (worth && avx512() && k > 0 && n > 0).then(|| pack(b, k, n));
        PackedRhs { b, k, n, panels }
    }

    /// out `[m, n]` (row-major) = a `[m, k]` (row-major) · B, added to out's values when
    /// `accumulate`; on the calling thread, or (`threads`: the `gemm` crate) on all of them.
    pub(crate) fn product(
        &self,
        out: &mut [f32],
        m: usize,
        a: &[f32],
        accumulate: bool,
        threads: bool,
    ) {
        let (k, n) = (self.k, self.n);
        match &self.panels {
            Some(panels) if !threads && m > 0 => {
                assert!(a.len() >= m * k && out.len() >= m * n);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: panels exist only when the processor has AVX-512F; a and out hold
                // m·k and m·n values (checked above).
                unsafe {
                    packed_product(out, m, n, k, a, panels, accumulate)
                };
            }
            _ => product(out, m, n, k, rows(a, k), self.b, accumulate, threads),
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The panels of b `[k, n]`: ⌈n / NR⌉ blocks of k·NR values, zero past column n.
fn pack(b: View, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n.div_ceil(NR) * k * NR];
    pack_panels(b, 0, k, n, &mut out);
    out
}

/// Rows k0 .. k0 + kc of b (columns 0..n) as panels of kc·NR values into `out`.
fn pack_panels(b: View, k0: usize, kc: usize, n: usize, out: &mut [f32]) {
    for (p, panel) in out[..n.div_ceil(NR) * kc * NR]
        .chunks_exact_mut(kc * NR)
        .enumerate()
    {
        let c0 = p * NR;
        let width = (n - c0).min(NR);
        for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
            let at = (k0 + kk) * b.rs + c0 * b.cs;
            if b.cs == 1 {
                row[..width].copy_from_slice(&b.data[at..at + width]);
            } else if b.rs != 1 {
                for (j, v) in row[..width].iter_mut().enumerate() {
                    *v = b.data[at + j * b.cs];
                }
            }
            row[width..].fill(0.0);
        }
        if b.rs == 1 && b.cs != 1 {
            // B stored transposed: read each column's kc values in order.
            for j in 0..width {
                let column = &b.data[(c0 + j) * b.cs + k0..][..kc];
                for (kk, v) in column.iter().enumerate() {
                    panel[kk * NR + j] = *v;
                }
            }
        }
    }
}

/// The row blocks of `m` rows: MR rows, then 8, 4, 2 and 1 for the rest, each as (first row,
/// rows).
fn row_blocks(m: usize) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let mut r = 0;
    while r + MR <= m {
        blocks.push((r, MR));
        r += MR;
    }
    for rows in [8, 4, 2, 1] {
        if r + rows <= m {
            blocks.push((r, rows));
            r += rows;
        }
    }
    blocks
}

/// Rows m0 .. m0 + mc, columns k0 .. k0 + kc of a, each block of R rows (of
/// [`row_blocks`]`(mc)`) interleaved `[kc, R]` into `out`: the R values the product broadcasts
/// at step κ lie side by side, at fixed offsets from one pointer.
fn pack_rows(a: View, m0: usize, mc: usize, k0: usize, kc: usize, out: &mut [f32]) {
    for (r0, rows) in row_blocks(mc) {
        let block = &mut out[r0 * kc..(r0 + rows) * kc];
        let first = m0 + r0;
        match rows {
            MR => pack_block::<MR>(a, first, k0, kc, block),
            8 => pack_block::<8>(a, first, k0, kc, block),
            4 => pack_block::<4>(a, first, k0, kc, block),
            2 => pack_block::<2>(a, first, k0, kc, block),
            _ => pack_block::<1>(a, first, k0, kc, block),
        }
    }
}

/// R rows of a from row `first`, columns k0 .. k0 + kc, as `[kc, R]` into `out`.
fn pack_block<const R: usize>(a: View, first: usize, k0: usize, kc: usize, out: &mut [f32]) {
    let out = &mut out[..kc * R];
    if a.rs == 1 {
        // A stored transposed: the R values of step κ are adjacent already.
        for (kk, step) in out.chunks_exact_mut(R).enumerate() {
            let at = (k0 + kk) * a.cs + first;
            step.copy_from_slice(&a.data[at..at + R]);
        }
    } else if a.cs == 1 {
        let src: [&[f32]; R] = std::array::from_fn(|r| &a.data[(first + r) * a.rs + k0..][..kc]);
        for (kk, step) in out.chunks_exact_mut(R).enumerate() {
            for (v, row) in step.iter_mut().zip(&src) {
                *v = row[kk];
            }
        }
    } else {
        for (kk, step) in out.chunks_exact_mut(R).enumerate() {
            for (r, v) in step.iter_mut().enumerate() {
                *v = a.data[(first + r) * a.rs + (k0 + kk) * a.cs];
            }
        }
    }
}

/// out (+)= the packed rows `a` (`[m, k]` in [`row_blocks`]) · the packed `panels` of B
/// (`[k, n]`), out's rows `out_rs` apart.
///
/// # Safety
/// The processor has AVX-512F; out holds m rows of n values `out_rs` apart; a holds m·k and
/// panels ⌈n / NR⌉·k·NR values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_kernel(
    out: *mut f32,
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    panels: &[f32],
    accumulate: bool,
) {
    let blocks = row_blocks(m);
    for (p, panel) in panels[..n.div_ceil(NR) * k * NR]
        .chunks_exact(k * NR)
        .enumerate()
    {
        let c0 = p * NR;
        let width = (n - c0).min(NR);
        // Lanes of the two vectors that hold columns of C.
        let lo = ((1u32 << width.min(16)) - 1) as u16;
        let hi = ((1u32 << width.saturating_sub(16)) - 1) as u16;
        for &(r0, rows) in &blocks {
            let ar = a[r0 * k..(r0 + rows) * k].as_ptr();
            let pp = panel.as_ptr();
            // SAFETY: the block reads its rows·k packed values of a and k·NR of the panel and
            // writes rows r0..r0 + rows of out (columns c0 .. c0 + width), inside the m rows
            // the caller vouches for.
            unsafe {
                let or = out.add(r0 * out_rs + c0);
                match rows {
                    MR => block::<MR>(or, out_rs, ar, pp, k, lo, hi, accumulate),
                    8 => block::<8>(or, out_rs, ar, pp, k, lo, hi, accumulate),
                    4 => block::<4>(or, out_rs, ar, pp, k, lo, hi, accumulate),
                    2 => block::<2>(or, out_rs, ar, pp, k, lo, hi, accumulate),
                    _ => block::<1>(or, out_rs, ar, pp, k, lo, hi, accumulate),
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn packed_product(
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    panels: &[f32],
    accumulate: bool,
) {
    let mut ap = vec![0f32; m * k];
    pack_rows(rows(a, k), 0, m, 0, k, &mut ap);
    // SAFETY: out holds m·n values (checked by the caller), ap m·k, panels ⌈n/NR⌉·k·NR.
    unsafe { packed_kernel(out.as_mut_ptr(), n, m, n, k, &ap, panels, accumulate) };
}

/// Fewer rows than this and the blocked product's packing does not pay: its callers leave such
/// products (a sampled sequence's single row, a layer with a handful of inputs) to the `gemm`
/// crate.
pub(crate) const BLOCKED_MIN_ROWS: usize = 16;

/// Depth of a block of [`large_product`]: a panel of B, KC·NR values (32 KiB), stays in the
/// L1 cache while the row blocks of A pass over it.
const KC: usize = 256;
/// Rows of A packed at a time: MC·KC values (96 KiB), in the L2 cache.
const MC: usize = 96;

/// A raw pointer that threads writing disjoint columns may share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes its own rows or columns of the output (see `large_product`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The address `offset` values on.
    ///
    /// # Safety
    /// Inside the output buffer.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's promise.
        unsafe { self.0.add(offset) }
    }
}

/// out `[m, n]` (row-major, rows `out_rs` apart) = a `[m, k]` · b `[k, n]` (any strides),
/// added to out's values when `accumulate`: the large products of a layer (a recurrence's
/// input projection and weight gradients, with k up to T·B; a dense layer's weight gradient
/// over many rows). Blocked as BLIS does — B packed KC rows at a time into panels, A MC rows
/// at a time into interleaved row blocks, the same register kernel as [`PackedRhs`] — with
/// the columns shared among the threads in whole panels (or the rows, when A is the larger
/// operand). Without AVX-512 (or for an empty product), the `gemm` crate on all threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn large_product(
    out: &mut [f32],
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        crate::ops::product_into(out, out_rs, m, n, k, a, b, accumulate, true);
        return;
    }
    assert!(n <= out_rs && (m - 1) * out_rs + n <= out.len());
    // SAFETY: out holds the m rows (checked above) and, a mutable borrow, aliases neither a
    // nor b.
    unsafe { large_product_raw(out.as_mut_ptr(), out_rs, m, n, k, a, b, accumulate) };
}

/// [`large_product`] as a new row-major `[m, n]` buffer, which the product writes without
/// reading: no zero fill first (for a recurrent layer's input projection, 26 MB a layer and
/// batch, the fill cost as much as a pass of the product's own writes).
pub(crate) fn new_large_product(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    // SAFETY: with accumulate = false the product reads none of the new buffer and writes all
    // m·n values (rows n apart); a new buffer aliases neither a nor b.
    unsafe {
        written_in_full(m * n, |out| {
            large_product_raw(out.as_mut_ptr().cast(), n, m, n, k, a, b, false)
        })
    }
}

/// [`large_product`] through a pointer; m, n, k ≥ 1.
///
/// # Safety
/// `out` is valid for writes (and reads, when `accumulate`) of m rows of n values `out_rs`
/// apart (n ≤ out_rs), and overlaps neither a nor b.
#[allow(clippy::too_many_arguments)]
unsafe fn large_product_raw(
    out: *mut f32,
    out_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    accumulate: bool,
) {
    if !avx512() {
        // SAFETY: the caller's promise.
        unsafe { crate::ops::gemm_raw(out, out_rs, m, n, k, a, b, accumulate, true) };
        return;
    }
    assert!((m - 1) * a.rs + (k - 1) * a.cs < a.data.len());
    assert!((k - 1) * b.rs + (n - 1) * b.cs < b.data.len());
    let threads = rayon::current_num_threads().max(1);
    let o = OutPtr(out);
    // Each task packs all of the operand it does not split: split the columns when B is the
    // larger (every task then packs A, m·k values), the rows when A is.
    let tasks: Vec<(usize, usize, usize, usize)> = if n >= m {
        let per = n.div_ceil(NR).div_ceil(threads) * NR;
        (0..n)
            .step_by(per)
            .map(|c0| (0, m, c0, per.min(n - c0)))
            .collect()
    } else {
        let per = m.div_ceil(threads).div_ceil(MR) * MR;
        (0..m)
            .step_by(per)
            .map(|r0| (r0, per.min(m - r0), 0, n))
            .collect()
    };
    tasks.into_par_iter().for_each(|(r0, m, c0, width)| {
        let a = View {
            data: &a.data[r0 * a.rs..],
            ..a
        };
        let b = View {
            data: &b.data[c0 * b.cs..],
            ..b
        };
        let mut bp = vec![0f32; width.div_ceil(NR) * NR * KC.min(k)];
        let mut ap = vec![0f32; MC.min(m) * KC.min(k)];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            pack_panels(b, k0, kc, width, &mut bp);
            for m0 in (0..m).step_by(MC) {
                let mc = MC.min(m - m0);
                pack_rows(a, m0, mc, k0, kc, &mut ap);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was checked; this task's rows and columns lie inside out
                // (the caller's promise), and no other task writes them; ap and bp hold what
                // the kernel reads.
                unsafe {
                    packed_kernel(
                        o.at((r0 + m0) * out_rs + c0),
                        out_rs,
                        mc,
                        width,
                        kc,
                        &ap,
                        &bp,
                        accumulate || k0 > 0,
                    )
                };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize>(
    out: *mut f32,
    out_rs: usize,
    a: *const f32,
    panel: *const f32,
    k: usize,
    lo: u16,
    hi: u16,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY (whole body): the caller guarantees k·R values of a, a panel of k·NR values, and
    // R rows of out with the lanes of lo/hi inside them.
    unsafe {
        let (mut a, mut b) = (a, panel);
        for _ in 0..k {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
            a = a.add(R);
            b = b.add(NR);
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = out.add(r * out_rs);
            let (mut c0, mut c1) = (acc[0], acc[1]);
            if accumulate {
                c0 = _mm512_add_ps(_mm512_maskz_loadu_ps(lo, o), c0);
                c1 = _mm512_add_ps(_mm512_maskz_loadu_ps(hi, o.add(16)), c1);
            }
            _mm512_mask_storeu_ps(o, lo, c0);
            _mm512_mask_storeu_ps(o.add(16), hi, c1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::transposed;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// The packed product equals the `gemm` crate's to rounding, for every row remainder
    /// (m = 1…27), column counts that fill and do not fill a panel, both operand layouts, with
    /// and without accumulation.
    #[test]
    fn packed_product_is_gemms() {
        for &(k, n) in &[(7, 5), (64, 32), (37, 70), (256, 1024), (33, 296)] {
            let b = values(k * n, 3);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (view, name) in [
                (rows(&b, n), "row-major"),
                (transposed(&bt, k), "transposed"),
            ] {
                let packed = PackedRhs::new(view, k, n, true);
                for m in [1, 2, 3, 5, 8, 11, 12, 13, 24, 27] {
                    let a = values(m * k, 7);
                    for accumulate in [false, true] {
                        let start = values(m * n, 11);
                        let mut want = start.clone();
                        product(&mut want, m, n, k, rows(&a, k), view, accumulate, false);
                        let mut got = start.clone();
                        packed.product(&mut got, m, &a, accumulate, false);
                        let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * scale,
                                "{name} k {k} n {n} m {m} acc {accumulate} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The blocked product equals the `gemm` crate's to rounding: columns shared (n ≥ m) and
    /// rows shared (m > n), several depth blocks (k > KC) and row blocks (m > MC), A and B
    /// row-major and transposed, with and without accumulation, rows of out wider than n; and
    /// written into a new buffer without a zero fill, to the bit.
    #[test]
    fn large_product_is_gemms() {
        for &(m, k, n) in &[(50, 600, 70), (300, 300, 40), (97, 257, 97), (16, 5, 1000)] {
            let a = values(m * k, 5);
            let b = values(k * n, 9);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for (av, bv) in [
                (rows(&a, k), rows(&b, n)),
                (transposed(&at, m), transposed(&bt, k)),
            ] {
                for accumulate in [false, true] {
                    let out_rs = n + 3;
                    let start = values(m * out_rs, 2);
                    let mut want = start.clone();
                    crate::ops::product_into(&mut want, out_rs, m, n, k, av, bv, accumulate, true);
                    let mut got = start.clone();
                    large_product(&mut got, out_rs, m, n, k, av, bv, accumulate);
                    if !accumulate {
                        // The same product into a new buffer, without its zero fill.
                        let mut dense = vec![0f32; m * n];
                        large_product(&mut dense, n, m, n, k, av, bv, false);
                        assert_eq!(new_large_product(m, n, k, av, bv), dense);
                    }
                    let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * scale,
                            "{m}×{k}·{k}×{n} acc {accumulate} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
