//! GELU and LeakyReLU as one vectorised flex operation each, forward and backward.
//!
//! GELU(x) = x·Φ(x) = ½·x·(1 + erf(x/√2)),  GELU′(x) = Φ(x) + x·φ(x),  φ(x) = e^{−x²/2}/√(2π)
//!
//! Burn's `gelu` on flex computes erf one element at a time with the C library's `erff` (in the
//! character Transformer's profile, erf alone took 13% of a training step) and its backward in
//! several more passes. Here erf is Abramowitz and Stegun's 7.1.26,
//! erf(z) = 1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^{−z²}, t = 1/(1 + p·z) for z ≥ 0 (odd in z),
//! within 1.5·10⁻⁷ of erf (6.4·10⁻⁷ in f32), with e^{−z²} from the same vectorised exponential as the other
//! kernels: one pass forward, one backward, rows of work shared among threads. Other backends
//! take Burn's `gelu`; a unit test compares the two, values and gradients.
//!
//! tanh(x) = sign(x)·(1 − t)/(1 + t) with t = e^{−2|x|} (the same vectorised exponential), and
//! for |x| < ¼, where 1 − t would lose digits, the Taylor series
//! x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 (the next term is under 4·10⁻⁹ there);
//! tanh′(x) = 1 − tanh²(x). Burn's `tanh` on flex calls the C library's `tanhf`/`expm1f` one
//! element at a time (5% of the DCGAN's training step, a third of its sampling).
//!
//! LeakyReLU_a(x) = x for x ≥ 0, a·x below; its derivative is 1 or a. Burn builds it from a
//! comparison, a product and a masked select (three passes and three tensors each way — 13% of
//! the DCGAN's training step in its profile); here it is one pass each way.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::ops::{
    contiguous, exp_nonpositive, f32s, on_flex_f32, unary_with_backward, written_in_full,
};

#[backend_extension(Flex, Autodiff)]
pub trait ActivationOps: Backend {
    /// GELU(x) = x·Φ(x), element by element.
    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// LeakyReLU: x where x ≥ 0, `slope`·x elsewhere.
    fn leaky_relu(x: FloatTensor<Self>, slope: f64) -> FloatTensor<Self>;

    /// tanh(x), element by element.
    fn tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// tanh(x): on flex (f32) one vectorised operation each way, elsewhere Burn's.
pub fn tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !on_flex_f32(&x) {
        return burn::tensor::activation::tanh(x);
    }
    Tensor::from_dispatch(<Dispatch as ActivationOps>::tanh(x.into_dispatch()))
}

/// GELU(x) = ½·x·(1 + erf(x/√2)): on flex (f32) one fused operation, elsewhere Burn's.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !on_flex_f32(&x) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as ActivationOps>::gelu(x.into_dispatch()))
}

/// LeakyReLU_a(x) = max(x, 0) + a·min(x, 0): on flex (f32) one fused operation, elsewhere
/// Burn's `leaky_relu`.
pub fn leaky_relu<const D: usize>(x: Tensor<D>, slope: f64) -> Tensor<D> {
    if !on_flex_f32(&x) {
        return burn::tensor::activation::leaky_relu(x, slope);
    }
    Tensor::from_dispatch(<Dispatch as ActivationOps>::leaky_relu(
        x.into_dispatch(),
        slope,
    ))
}

/// erf(z), Abramowitz and Stegun 7.1.26 (|error| ≤ 1.5·10⁻⁷, 6.4·10⁻⁷ in f32), vectorisable.
#[inline(always)]
fn erf(z: f32) -> f32 {
    erf_and_gauss(z).0
}

/// (erf(z), e^{−z²}): [`erf`] and the Gaussian factor it computes on the way (GELU′ needs
/// both: with z = x/√2, e^{−z²} = e^{−x²/2} = √(2π)·φ(x)).
#[inline(always)]
fn erf_and_gauss(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let gauss = exp_nonpositive(-a * a);
    let y = 1.0 - poly * gauss;
    (y.copysign(z), gauss)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_loop(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2)));
    }
}

/// ∂L/∂x = g·(Φ(x) + x·φ(x)).
#[inline(always)]
fn gelu_grad_loop(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        let (erf, gauss) = erf_and_gauss(v * FRAC_1_SQRT_2);
        let cdf = 0.5 * (1.0 + erf);
        let pdf = INV_SQRT_2PI * gauss;
        o.write(g * (cdf + v * pdf));
    }
}

/// tanh(x), vectorisable (the module docs' formulas; both are computed and one is chosen).
#[inline(always)]
fn tanh_of(x: f32) -> f32 {
    let a = x.abs();
    let t = exp_nonpositive(-2.0 * a);
    let far = (1.0 - t) / (1.0 + t);
    let a2 = a * a;
    let near = a
        * (1.0
            + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))));
    let y = if a < 0.25 { near } else { far };
    y.copysign(x)
}

#[inline(always)]
fn tanh_loop(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(tanh_of(v));
    }
}

/// ∂L/∂x = g·(1 − tanh²(x)).
#[inline(always)]
fn tanh_grad_loop(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        let y = tanh_of(v);
        o.write(g * (1.0 - y * y));
    }
}

#[inline(always)]
fn leaky_loop(x: &[f32], a: f32, out: &mut [MaybeUninit<f32>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(if v >= 0.0 { v } else { a * v });
    }
}

/// ∂L/∂x = g where x ≥ 0, a·g elsewhere.
#[inline(always)]
fn leaky_grad_loop(x: &[f32], g: &[f32], a: f32, out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        o.write(if v >= 0.0 { g } else { a * g });
    }
}

widest_simd! {
    /// [`leaky_loop`] in the widest vector instructions the processor has.
    fn leaky_chunk(x: &[f32], a: f32, out: &mut [MaybeUninit<f32>]) => leaky_loop
}

widest_simd! {
    /// [`leaky_grad_loop`] in the widest vector instructions the processor has.
    fn leaky_grad_chunk(x: &[f32], g: &[f32], a: f32, out: &mut [MaybeUninit<f32>]) => leaky_grad_loop
}

widest_simd! {
    /// [`gelu_loop`] in the widest vector instructions the processor has.
    fn gelu_chunk(x: &[f32], out: &mut [MaybeUninit<f32>]) => gelu_loop
}

widest_simd! {
    /// [`gelu_grad_loop`] in the widest vector instructions the processor has.
    fn gelu_grad_chunk(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) => gelu_grad_loop
}

widest_simd! {
    /// [`tanh_loop`] in the widest vector instructions the processor has.
    fn tanh_chunk(x: &[f32], out: &mut [MaybeUninit<f32>]) => tanh_loop
}

widest_simd! {
    /// [`tanh_grad_loop`] in the widest vector instructions the processor has.
    fn tanh_grad_chunk(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) => tanh_grad_loop
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// A new buffer of `f(x, out)` over `x` in [`CHUNK`]-sized pieces on all threads, `out` the
/// piece's share of the new buffer, as long as `x`'s piece — which `f` writes in full, so
/// the buffer needs no zero fill first.
fn map_new(x: &[f32], f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Send + Sync) -> Vec<f32> {
    let pieces = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| f(x, o))
    };
    // SAFETY: every chunk loop above writes each of its outputs (they zip the outputs with
    // inputs of the same length), so all x.len() values are initialised.
    unsafe { written_in_full(x.len(), pieces) }
}

/// [`map_new`] of two inputs of the same length.
fn map2_new(
    x: &[f32],
    g: &[f32],
    f: impl Fn(&[f32], &[f32], &mut [MaybeUninit<f32>]) + Send + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), g.len());
    let pieces = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| f(x, g, o))
    };
    // SAFETY: as in `map_new`: each chunk loop writes all its outputs.
    unsafe { written_in_full(x.len(), pieces) }
}

fn same_shape(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().to_vec()))
}

impl ActivationOps for Flex {
    fn gelu(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let v = f32s(&x);
        same_shape(map_new(v, gelu_chunk), &x)
    }

    fn leaky_relu(x: FlexTensor, slope: f64) -> FlexTensor {
        let x = contiguous(&x);
        let v = f32s(&x);
        same_shape(map_new(v, |x, o| leaky_chunk(x, slope as f32, o)), &x)
    }

    fn tanh(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let v = f32s(&x);
        same_shape(map_new(v, tanh_chunk), &x)
    }
}

fn tanh_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (x, grad) = (contiguous(x), contiguous(grad));
    let (v, g) = (f32s(&x), f32s(&grad));
    same_shape(map2_new(v, g, tanh_grad_chunk), &x)
}

fn leaky_backward(x: &FlexTensor, grad: &FlexTensor, slope: f32) -> FlexTensor {
    let (x, grad) = (contiguous(x), contiguous(grad));
    let (v, g) = (f32s(&x), f32s(&grad));
    same_shape(
        map2_new(v, g, |x, g, o| leaky_grad_chunk(x, g, slope, o)),
        &x,
    )
}

fn gelu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (x, grad) = (contiguous(x), contiguous(grad));
    let (v, g) = (f32s(&x), f32s(&grad));
    same_shape(map2_new(v, g, gelu_grad_chunk), &x)
}

impl<C: CheckpointStrategy> ActivationOps for Autodiff<Flex, C> {
    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary_with_backward::<C, _>(x, Flex::gelu, gelu_backward)
    }

    fn leaky_relu(x: FloatTensor<Self>, slope: f64) -> FloatTensor<Self> {
        unary_with_backward::<C, _>(
            x,
            |x| Flex::leaky_relu(x, slope),
            move |x, g| leaky_backward(x, g, slope as f32),
        )
    }

    fn tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary_with_backward::<C, _>(x, Flex::tanh, tanh_backward)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::tensor::{Device, Distribution};

    /// The fused LeakyReLU gives exactly Burn's values and gradients (zeros included), on a
    /// tensor large enough to be shared among threads.
    #[test]
    fn leaky_relu_matches_burns_operations() {
        let d = Device::flex().autodiff();
        d.seed(6);
        // Exact zeros too: both take the x ≥ 0 branch there.
        let x0 = Tensor::<2>::random([300, 257], Distribution::Uniform(-3.0, 3.0), &d)
            .mul_scalar(4.0)
            .round()
            .div_scalar(4.0);
        let w = Tensor::<2>::random([300, 257], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let y = if fused {
                leaky_relu(x.clone(), 0.2)
            } else {
                burn::tensor::activation::leaky_relu(x.clone(), 0.2)
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (to_vec(y), to_vec(x.grad(&g).unwrap()))
        };
        assert!(to_vec(x0.clone()).contains(&0.0));
        assert_eq!(run(true), run(false));
        // Without autodiff, the plain forward.
        let plain = Tensor::<1>::from_data(
            TensorData::new(vec![-2.0f32, 0.0, 3.0], [3]),
            &Device::flex(),
        );
        assert_eq!(to_vec(leaky_relu(plain, 0.1)), [-0.2, 0.0, 3.0]);
    }

    /// The fused GELU gives Burn's values and gradients, from −10 to 10, on a tensor large
    /// enough to be shared among threads.
    #[test]
    fn gelu_matches_burns_operations() {
        let d = Device::flex().autodiff();
        d.seed(5);
        let x0 = Tensor::<2>::random([300, 257], Distribution::Uniform(-10.0, 10.0), &d);
        let w = Tensor::<2>::random([300, 257], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let y = if fused {
                gelu(x.clone())
            } else {
                burn::tensor::activation::gelu(x.clone())
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (to_vec(y), to_vec(x.grad(&g).unwrap()))
        };
        let (y, g) = run(true);
        let (want_y, want_g) = run(false);
        for (a, b) in y.iter().zip(&want_y) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        for (a, b) in g.iter().zip(&want_g) {
            assert!((a - b).abs() <= 2e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// erf against a series in f64 over [−6, 6]; GELU at hand-checked points.
    #[test]
    fn erf_and_gelu_values() {
        let mut worst = 0f64;
        for k in 0..=120_000 {
            let z = -6.0 + k as f32 / 10_000.0;
            worst = worst.max((erf(z) as f64 - libm_erf(z as f64)).abs());
        }
        // 1.5·10⁻⁷ in exact arithmetic; in f32, 1 − poly·e^{−z²} loses a few units of the last
        // place near z = 0, where both are close to 1 (absolute error, which GELU scales by x/2).
        assert!(worst < 1e-6, "{worst}");
        let out = map_new(&[0.0, 1.0, -1.0], gelu_loop);
        // GELU(1) = Φ(1) = 0.841344746…, GELU(−1) = −(1 − Φ(1)).
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 0.841_344_7).abs() < 3e-7);
        assert!((out[2] + 0.158_655_3).abs() < 3e-7);
    }

    /// erf in f64 by its series (accurate to 1e-12 on [−6, 6] with enough terms).
    fn libm_erf(z: f64) -> f64 {
        if z.abs() > 3.0 {
            // The continued fraction would do; beyond 3, 1 − erf < 2.3e-5 and the series
            // cancels badly, so use the asymptotic complement.
            let a = z.abs();
            let mut term = 1.0;
            let mut sum = 1.0;
            for n in 1..8 {
                term *= -((2 * n - 1) as f64) / (2.0 * a * a);
                sum += term;
            }
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * sum;
            return (1.0 - erfc).copysign(z);
        }
        let mut term = z;
        let mut sum = z;
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    /// tanh within 4·10⁻⁷ of f64's, relatively, from 10⁻⁸ to 100 (both sides of the switch at
    /// ¼ included), and its gradient Burn's on a tensor shared among threads.
    #[test]
    fn tanh_matches_f64_and_burns_gradient() {
        let mut xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.01).collect();
        xs.extend([
            1e-8, -3e-6, 0.2499, 0.25, 0.2501, 9.0, -20.0, 100.0, -100.0, 0.0,
        ]);
        let out = map_new(&xs, tanh_chunk);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = (x as f64).tanh();
            assert!(
                (y as f64 - want).abs() <= 4e-7 * want.abs(),
                "tanh({x}) = {y}, want {want}"
            );
        }
        let d = Device::flex().autodiff();
        d.seed(7);
        let x0 = Tensor::<2>::random([300, 257], Distribution::Normal(0.0, 2.0), &d);
        let w = Tensor::<2>::random([300, 257], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let y = if fused {
                tanh(x.clone())
            } else {
                burn::tensor::activation::tanh(x.clone())
            };
            let g = (y.clone() * w.clone()).sum().backward();
            (to_vec(y), to_vec(x.grad(&g).unwrap()))
        };
        let ((y, g), (want_y, want_g)) = (run(true), run(false));
        for (a, b) in y.iter().zip(&want_y).chain(g.iter().zip(&want_g)) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
