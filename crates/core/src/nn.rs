//! Layers whose Burn version is slow on the CPU for kiln's shapes, computed differently but
//! to the same formula.
//!
//! [`dropout`] is inverted dropout, as Burn's `Dropout`: in training every unit is kept with
//! probability q = 1 − p and scaled by 1/q, so E\[out\] = x:
//!
//! out_i = x_i · m_i / q,  m_i ~ Bernoulli(q).
//!
//! Burn draws m from its device generator, one `Bernoulli` sample per element (on flex a
//! ChaCha generator and a float comparison per pixel), which is about half of the MLP's epoch
//! time with 10% input dropout. Here the mask m/q is drawn on the host by a xoshiro generator,
//! 32 random bits per element compared against ⌊q·2³²⌋, and applied with one multiplication.
//! The generator is reseeded by the training loop from (seed, epoch), so runs stay
//! reproducible and a resumed run draws the same masks as an uninterrupted one.

use std::cell::RefCell;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::nn::Dropout;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    /// One generator per thread: the training loop runs on one thread, and tests training
    /// side by side in one process do not disturb each other's masks.
    static MASK_RNG: RefCell<SmallRng> = RefCell::new(SmallRng::seed_from_u64(0));
}

/// Every float parameter of a module, flattened in the module's visiting order (for tests
/// that compare parameters, across steps or across devices).
pub fn parameters<M: Module>(module: &M) -> Vec<f32> {
    parameter_tensors(module).concat()
}

/// Every float parameter tensor of a module, each flattened, in the visiting order.
pub fn parameter_tensors<M: Module>(module: &M) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(crate::data::to_vec(param.val()));
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

/// Moving average of a module's weights: θ̄ ← w·θ + (1 − w)·θ̄ for every float parameter
/// *and* buffer (batch norm's running statistics), in the modules' common visiting order.
/// `avg` is θ̄, `live` is θ (same architecture, same device). With w = 1 − β this is the
/// exponential moving average θ̄_t = β·θ̄_{t−1} + (1 − β)·θ_t of a GAN generator's weights
/// (Yazıcı et al. 2019); with w = τ it is DQN's soft target update θ⁻ ← τ·θ + (1 − τ)·θ⁻.
pub fn blend<M: Module>(avg: M, live: &M, w: f64) -> M {
    struct Collect(Vec<Tensor<1>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().flatten(0, D - 1));
        }
    }
    struct Mix {
        live: std::vec::IntoIter<Tensor<1>>,
        w: f64,
    }
    impl ModuleMapper for Mix {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let live = self
                .live
                .next()
                .expect("blend: both modules have the same parameters");
            let (id, avg, mapper) = param.consume();
            let shape = avg.shape();
            let mixed = live.reshape(shape).mul_scalar(self.w) + avg.mul_scalar(1.0 - self.w);
            Param::from_mapped_value(id, mixed, mapper)
        }
    }
    let mut c = Collect(Vec::new());
    live.visit(&mut c);
    avg.map(&mut Mix {
        live: c.0.into_iter(),
        w,
    })
}

/// Reseed this thread's generator of dropout masks (the training loop does this every epoch).
pub fn seed_dropout(seed: u64) {
    MASK_RNG.with(|rng| *rng.borrow_mut() = SmallRng::seed_from_u64(seed));
}

/// `n` mask values m_i/q: 1/q with probability q = 1 − p, else 0.
fn mask(n: usize, p: f64) -> Vec<f32> {
    let keep = 1.0 - p;
    // P(u < threshold) = threshold / 2³² for u uniform on [0, 2³²).
    let threshold = (keep * 4_294_967_296.0).round().min(u32::MAX as f64) as u64;
    let scale = (1.0 / keep) as f32;
    MASK_RNG.with(|rng| {
        let rng = &mut *rng.borrow_mut();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let bits = rng.next_u64();
            for half in [bits & 0xffff_ffff, bits >> 32] {
                if out.len() < n {
                    out.push(if half < threshold { scale } else { 0.0 });
                }
            }
        }
        out
    })
}

/// `n` draws of the standard normal N(0, 1) from `rng` (Box–Muller: for u₁, u₂ uniform on
/// (0, 1], √(−2 ln u₁)·cos(2πu₂) and √(−2 ln u₁)·sin(2πu₂) are independent standard normals).
/// Drawn on the host so that noise (a VAE's ε, a GAN's z) is the same on every backend.
pub fn standard_normal(rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 − [0, 1) is (0, 1]: ln u₁ is finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// `n` draws of the standard normal truncated to [−ψ, ψ] (BigGAN's truncation trick): every
/// draw with |v| > ψ is drawn again. Smaller ψ keeps the noise near the mode, trading the
/// samples' variety for their typicality; ψ = ∞ is [`standard_normal`].
pub fn truncated_normal(rng: &mut impl rand::Rng, n: usize, psi: f64) -> Vec<f32> {
    assert!(psi > 0.0, "truncation must be positive");
    let mut out = standard_normal(rng, n);
    for v in &mut out {
        while f64::from(*v).abs() > psi {
            *v = standard_normal(rng, 1)[0];
        }
    }
    out
}

/// Check that each named dropout probability is in [0, 1) (1 would drop every unit), for a
/// model's `build`: the error names the first bad field.
pub fn check_dropout(probabilities: &[(&str, f64)]) -> Result<(), String> {
    match probabilities.iter().find(|(_, p)| !(0.0..1.0).contains(p)) {
        Some((field, p)) => Err(format!("{field}: must be in [0, 1), got {p}")),
        None => Ok(()),
    }
}

/// Apply `layer` (Burn's `Dropout`, which holds p and the training flag) to `x`: the identity
/// outside training, or when p = 0 or the device has no autodiff, as Burn's own.
pub fn dropout<const D: usize>(layer: &Dropout, x: Tensor<D>) -> Tensor<D> {
    if !layer.training.is_enabled() || !x.device().is_autodiff() || layer.prob == 0.0 {
        return x;
    }
    let shape = x.shape();
    let m = mask(shape.num_elements(), layer.prob);
    let m = Tensor::<D>::from_data(TensorData::new(m, shape), &x.device());
    x * m
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::DropoutConfig;
    use burn::tensor::Device;

    /// θ̄ ← w·θ + (1 − w)·θ̄ reaches every weight, bias and batch-norm buffer, and keeps θ̄'s
    /// parameter ids (an optimizer's state stays attached).
    #[test]
    fn blend_averages_every_parameter_and_buffer() {
        use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
        #[derive(Module, Debug)]
        struct Net {
            dense: Linear,
            bn: BatchNorm,
        }
        let dev = Device::flex().autodiff();
        dev.seed(5);
        let net = || Net {
            dense: LinearConfig::new(3, 4).init(&dev),
            bn: BatchNormConfig::new(4).init(&dev),
        };
        let (avg, live) = (net(), net());
        // Move the live running mean away from the average's (both start at 0).
        let x: Tensor<2> = Tensor::ones([8, 3], &dev);
        let _ = live.bn.forward(live.dense.forward(x).reshape([8, 4, 1]));
        let (avg, live) = (avg.valid(), live.valid());
        let id = avg.dense.weight.id;
        let (a, l) = (parameter_tensors(&avg), parameter_tensors(&live));
        let mixed = blend(avg, &live, 0.25);
        assert_eq!(mixed.dense.weight.id, id);
        let m = parameter_tensors(&mixed);
        assert_eq!(
            m.len(),
            6,
            "weight, bias, γ, β, running mean, running variance"
        );
        assert!(l[4].iter().any(|&v| v != 0.0), "the running mean moved");
        for ((m, a), l) in m.iter().zip(&a).zip(&l) {
            for ((m, a), l) in m.iter().zip(a).zip(l) {
                assert!((m - (0.25 * l + 0.75 * a)).abs() < 1e-6, "{m} {a} {l}");
            }
        }
    }

    #[test]
    fn truncated_normal_stays_inside_and_keeps_the_shape() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let v = truncated_normal(&mut rng, 100_000, 0.5);
        assert!(v.iter().all(|x| x.abs() <= 0.5));
        // N(0, 1) truncated to [−0.5, 0.5]: variance 1 − 2·0.5·φ(0.5)/(2Φ(0.5) − 1) ≈ 0.0806.
        let var = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((var - 0.0806).abs() < 0.002, "{var}");
    }

    #[test]
    fn mask_keeps_the_right_fraction_and_scales() {
        seed_dropout(3);
        let m = mask(100_001, 0.1);
        assert_eq!(m.len(), 100_001);
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        // E[m/q] = 1: the layer leaves the expected activation unchanged.
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn same_seed_same_mask() {
        seed_dropout(11);
        let a = mask(1000, 0.3);
        seed_dropout(11);
        let b = mask(1000, 0.3);
        assert_eq!(a, b);
        seed_dropout(12);
        assert_ne!(a, mask(1000, 0.3));
    }

    #[test]
    fn identity_outside_training() {
        let layer = DropoutConfig::new(0.5).init();
        let x = Tensor::<2>::ones([4, 8], &Device::flex());
        // No autodiff: inference, the input comes back unchanged.
        let y = dropout(&layer, x.clone());
        assert_eq!(y.into_data(), x.into_data());
    }

    #[test]
    fn training_drops_and_rescales() {
        seed_dropout(5);
        let layer = DropoutConfig::new(0.5).init();
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::ones([64, 64], &device);
        let y = crate::data::to_vec(dropout(&layer, x));
        assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((1700..2400).contains(&zeros), "{zeros} of 4096 dropped");
    }

    #[test]
    fn standard_normal_has_mean_0_and_variance_1() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let v = super::standard_normal(&mut rng, 100_001);
        assert_eq!(v.len(), 100_001);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
