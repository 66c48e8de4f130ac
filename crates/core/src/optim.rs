//! Optimizers chosen in config (`[train.optimizer]`), built from Burn's own implementations.
//!
//! With gradient g_t = ∇L(θ_t) and learning rate η:
//! - SGD:      v ← μ·v + g;  θ ← θ − η·v                  (μ = `momentum`, 0 = plain SGD)
//! - Adagrad:  G ← G + g²;   θ ← θ − η·g / (√G + ε)
//! - RMSprop:  s ← α·s + (1−α)·g²;  θ ← θ − η·g / (√s + ε)
//! - Adam:     m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − η·m̂ / (√v̂ + ε)
//!
//! With `weight_decay` λ > 0 every optimizer first adds the gradient of the L2 penalty
//! (λ/2)·‖θ‖² to the loss's: g ← g + λ·θ (PyTorch's `weight_decay`).
//!
//! With `clip_norm` c set, Burn's gradient clipping rescales the gradient of every parameter
//! tensor whose norm exceeds c: g ← g · min(1, c / ‖g‖₂) (per tensor, before the update; the
//! recurrent models use it against exploding gradients through time).
//!
//! Adam without weight decay takes its step on flex in one pass per parameter tensor
//! ([`FusedAdam`], [`crate::flex_ops`]): Burn's formulas in Burn's order, the same results,
//! Burn's `AdamState` in the checkpoints.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{
    AdaGradConfig, Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate,
    ModuleOptimizer, Optimizer, RmsPropConfig, SgdConfig,
};
use burn::tensor::{Device, Tensor};

use crate::flex_ops::{adam_coefficients, adam_step, on_flex_f32};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Sgd,
    #[default]
    Adam,
    Adagrad,
    Rmsprop,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub name: OptimizerName,
    /// SGD momentum μ (0 = none) and RMSprop momentum.
    pub momentum: f64,
    /// Adam β₁.
    pub beta1: f32,
    /// Adam β₂.
    pub beta2: f32,
    /// ε in the adaptive denominators.
    pub epsilon: f32,
    /// RMSprop smoothing α.
    pub alpha: f32,
    /// L2 penalty λ: g ← g + λ·θ before the update (0 = none).
    pub weight_decay: f32,
    /// Largest gradient norm per parameter tensor; larger gradients are scaled down to it
    /// (absent = no clipping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f32>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            name: OptimizerName::Adam,
            momentum: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            alpha: 0.99,
            weight_decay: 0.0,
            clip_norm: None,
        }
    }
}

impl OptimizerConfig {
    pub fn check(&self) -> Result<(), (String, String)> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err((
                "momentum".into(),
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        for (field, v) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("alpha", self.alpha),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err((field.into(), format!("must be in [0, 1), got {v}")));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err((
                "weight_decay".into(),
                format!("must be zero or positive, got {}", self.weight_decay),
            ));
        }
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(("clip_norm".into(), format!("must be positive, got {c}")));
        }
        if self.epsilon.is_nan() || self.epsilon <= 0.0 {
            return Err((
                "epsilon".into(),
                format!("must be positive, got {}", self.epsilon),
            ));
        }
        Ok(())
    }

    /// Build the Burn optimizer for a whole module.
    pub fn init(&self) -> ModuleOptimizer {
        let decay = (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay));
        let clip = self.clip_norm.map(GradientClippingConfig::Norm);
        match self.name {
            OptimizerName::Sgd => {
                let mut cfg = SgdConfig::new()
                    .with_weight_decay(decay)
                    .with_gradient_clipping(clip);
                if self.momentum > 0.0 {
                    // PyTorch's convention: no dampening.
                    cfg = cfg.with_momentum(Some(
                        MomentumConfig::new()
                            .with_momentum(self.momentum)
                            .with_dampening(0.0),
                    ));
                }
                cfg.init()
            }
            OptimizerName::Adam => {
                let adam = AdamConfig::new()
                    .with_beta_1(self.beta1)
                    .with_beta_2(self.beta2)
                    .with_epsilon(self.epsilon);
                if decay.is_some() {
                    adam.with_weight_decay(decay)
                        .with_grad_clipping(clip)
                        .init()
                } else {
                    let optim = ModuleOptimizer::from(FusedAdam {
                        burn: adam.build(),
                        beta1: self.beta1,
                        beta2: self.beta2,
                        epsilon: self.epsilon,
                    });
                    match clip {
                        Some(c) => optim.with_grad_clipping(c.init()),
                        None => optim,
                    }
                }
            }
            OptimizerName::Adagrad => AdaGradConfig::new()
                .with_epsilon(self.epsilon)
                .with_weight_decay(decay)
                .with_grad_clipping(clip)
                .init(),
            OptimizerName::Rmsprop => RmsPropConfig::new()
                .with_alpha(self.alpha)
                .with_momentum(self.momentum as f32)
                .with_epsilon(self.epsilon)
                .with_weight_decay(decay)
                .with_grad_clipping(clip)
                .init(),
        }
    }
}

/// Adam (without weight decay or AMSGrad): on flex, each parameter tensor's step is one pass
/// of [`crate::flex_ops::adam_step`]; elsewhere, Burn's `Adam`. Both keep Burn's `AdamState`,
/// so a checkpoint does not depend on where it was written.
#[derive(Clone)]
pub struct FusedAdam {
    burn: Adam,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamState<D>>,
    ) -> (Tensor<D>, Option<AdamState<D>>) {
        if !(on_flex_f32(&tensor) && on_flex_f32(&grad)) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (m, v, t) = match state {
            Some(s) if s.momentum.max_moment_2.is_none() => {
                let s = s.momentum;
                (s.moment_1, s.moment_2, s.time)
            }
            Some(s) => return self.burn.step(lr, tensor, grad, Some(s)),
            None => (grad.zeros_like(), grad.zeros_like(), 0),
        };
        let k = adam_coefficients(self.beta1, self.beta2, self.epsilon, t + 1, lr);
        let (theta, m, v) = adam_step(tensor, grad, m, v, k);
        let momentum = AdaptiveMomentumState::new(t + 1, m, v);
        (theta, Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: AdamState<D>, device: &Device) -> AdamState<D> {
        <Adam as Optimizer>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::to_vec;
    use burn::nn::LinearConfig;
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor};

    /// With a zero loss gradient, one SGD step with weight decay λ is θ ← θ − η·λ·θ.
    #[test]
    fn weight_decay_adds_lambda_theta_to_the_gradient() {
        let d = Device::flex().autodiff();
        d.seed(5);
        let layer = LinearConfig::new(2, 1).init(&d);
        let before = to_vec(layer.weight.val());
        let loss = layer
            .forward(Tensor::<2>::ones([1, 2], &d))
            .sum()
            .mul_scalar(0.0);
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        let cfg = OptimizerConfig {
            name: OptimizerName::Sgd,
            weight_decay: 0.1,
            ..OptimizerConfig::default()
        };
        let layer = cfg.init().step(0.5, layer, grads);
        let after = to_vec(layer.weight.val());
        for (b, a) in before.iter().zip(&after) {
            assert!((a - b * 0.95).abs() < 1e-7, "{b} → {a}");
        }
        let bad = OptimizerConfig {
            weight_decay: -1.0,
            ..OptimizerConfig::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "weight_decay");
    }

    /// With `clip_norm` c, a gradient of norm ‖g‖ > c moves θ by exactly η·c (SGD), and a
    /// small gradient is left alone.
    #[test]
    fn clip_norm_bounds_the_step() {
        let d = Device::flex().autodiff();
        d.seed(3);
        let step = |scale: f32, clip: Option<f32>| {
            let layer = LinearConfig::new(4, 1).with_bias(false).init(&d);
            let before = to_vec(layer.weight.val());
            let loss = layer
                .forward(Tensor::<2>::ones([1, 4], &d))
                .sum()
                .mul_scalar(scale);
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            let cfg = OptimizerConfig {
                name: OptimizerName::Sgd,
                clip_norm: clip,
                ..OptimizerConfig::default()
            };
            let after = to_vec(cfg.init().step(1.0, layer, grads).weight.val());
            before
                .iter()
                .zip(&after)
                .map(|(b, a)| ((b - a) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        // ∂L/∂w = scale·1 for each of the 4 weights: ‖g‖ = 2·scale.
        assert!((step(10.0, Some(1.0)) - 1.0).abs() < 1e-5);
        assert!((step(10.0, None) - 20.0).abs() < 1e-4);
        assert!((step(0.1, Some(1.0)) - 0.2).abs() < 1e-6);
        let bad = OptimizerConfig {
            clip_norm: Some(0.0),
            ..OptimizerConfig::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "clip_norm");
    }

    /// The one-pass Adam on flex gives Burn's Adam to the bit, step after step, for a
    /// parameter tensor large enough to be split among threads (60,000 weights) and a small
    /// one (the bias), with and without clipping; and a checkpoint it writes carries on in
    /// Burn's Adam exactly as in itself.
    #[test]
    fn fused_adam_is_burns_adam_to_the_bit() {
        let d = Device::flex().autodiff();
        d.seed(8);
        let x = Tensor::<2>::random([16, 300], burn::tensor::Distribution::Default, &d);
        for clip in [None, Some(0.5)] {
            let cfg = OptimizerConfig {
                clip_norm: clip,
                ..OptimizerConfig::default()
            };
            let burns = || {
                let c = AdamConfig::new()
                    .with_beta_1(cfg.beta1)
                    .with_beta_2(cfg.beta2)
                    .with_epsilon(cfg.epsilon)
                    .with_grad_clipping(clip.map(GradientClippingConfig::Norm));
                c.init()
            };
            let start = LinearConfig::new(300, 200).init(&d);
            let step = |optim: &mut ModuleOptimizer, layer: burn::nn::Linear| {
                let loss = layer.forward(x.clone()).powi_scalar(2).mean();
                let grads = GradientsParams::from_grads(loss.backward(), &layer);
                optim.step(1e-3, layer, grads)
            };
            let (mut fused, mut burn) = (cfg.init(), burns());
            let (mut a, mut b) = (start.clone(), start);
            for t in 0..5 {
                a = step(&mut fused, a);
                b = step(&mut burn, b);
                assert_eq!(to_vec(a.weight.val()), to_vec(b.weight.val()), "step {t}");
                let bias = |l: &burn::nn::Linear| to_vec(l.bias.as_ref().unwrap().val());
                assert_eq!(bias(&a), bias(&b), "step {t}");
            }
            // A checkpoint of the fused optimizer, loaded into Burn's, continues identically.
            let mut reloaded = burns().load_record(fused.to_record());
            let (a, b) = (step(&mut fused, a.clone()), step(&mut reloaded, a));
            assert_eq!(to_vec(a.weight.val()), to_vec(b.weight.val()));
        }
    }
}
