//! Optimizers chosen in config (`[train.optimizer]`), built from Burn's own implementations.
//!
//! With gradient g_t = ∇L(θ_t) and learning rate η:
//! - SGD:      v ← μ·v + g;  θ ← θ − η·v                  (μ = `momentum`, 0 = plain SGD)
//! - Adagrad:  G ← G + g²;   θ ← θ − η·g / (√G + ε)
//! - RMSprop:  s ← α·s + (1−α)·g²;  θ ← θ − η·g / (√s + ε)
//! - Adam:     m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − η·m̂ / (√v̂ + ε)

use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdaGradConfig, AdamConfig, ModuleOptimizer, RmsPropConfig, SgdConfig};
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
        match self.name {
            OptimizerName::Sgd => {
                let mut cfg = SgdConfig::new();
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
            OptimizerName::Adam => AdamConfig::new()
                .with_beta_1(self.beta1)
                .with_beta_2(self.beta2)
                .with_epsilon(self.epsilon)
                .init(),
            OptimizerName::Adagrad => AdaGradConfig::new().with_epsilon(self.epsilon).init(),
            OptimizerName::Rmsprop => RmsPropConfig::new()
                .with_alpha(self.alpha)
                .with_momentum(self.momentum as f32)
                .with_epsilon(self.epsilon)
                .init(),
        }
    }
}
