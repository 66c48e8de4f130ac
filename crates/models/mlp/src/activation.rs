//! The eleven activation functions of the course (course deck 1), chosen by name in configs.

use burn::tensor::Tensor;
use burn::tensor::activation as act;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// f(z) = z
    Linear,
    /// f(z) = 1 / (1 + e^(−z))
    Sigmoid,
    /// f(z) = (e^z − e^(−z)) / (e^z + e^(−z))
    Tanh,
    /// f(z) = z / (1 + |z|)
    Softsign,
    /// f(z) = max(0, z)
    #[default]
    Relu,
    /// f(z) = z if z > 0, else 0.01·z
    LeakyRelu,
    /// f(z) = ln(1 + e^z)
    Softplus,
    /// f(z) = z if z > 0, else α(e^z − 1), α = 1
    Elu,
    /// f(z) = λ·(z if z > 0, else α(e^z − 1)), λ ≈ 1.0507, α ≈ 1.6733
    Selu,
    /// f(z) = z·σ(z)
    Swish,
    /// f(z) = z·tanh(ln(1 + e^z))
    Mish,
}

impl Activation {
    pub const ALL: [Activation; 11] = [
        Activation::Linear,
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::Softsign,
        Activation::Relu,
        Activation::LeakyRelu,
        Activation::Softplus,
        Activation::Elu,
        Activation::Selu,
        Activation::Swish,
        Activation::Mish,
    ];

    pub fn apply<const D: usize>(self, z: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Linear => z,
            Activation::Sigmoid => act::sigmoid(z),
            Activation::Tanh => act::tanh(z),
            Activation::Softsign => act::softsign(z),
            Activation::Relu => act::relu(z),
            Activation::LeakyRelu => kiln_kernels::activation::leaky_relu(z, 0.01),
            Activation::Softplus => act::softplus(z, 1.0),
            Activation::Elu => act::elu(z, 1.0),
            Activation::Selu => act::selu(z),
            Activation::Swish => act::silu(z),
            Activation::Mish => act::mish(z),
        }
    }

    /// The same function on one number (reference for tests and plots).
    pub fn scalar(self, z: f64) -> f64 {
        let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
        let softplus = |z: f64| (1.0 + z.exp()).ln();
        let elu = |z: f64, a: f64| if z > 0.0 { z } else { a * (z.exp() - 1.0) };
        match self {
            Activation::Linear => z,
            Activation::Sigmoid => sigmoid(z),
            Activation::Tanh => z.tanh(),
            Activation::Softsign => z / (1.0 + z.abs()),
            Activation::Relu => z.max(0.0),
            Activation::LeakyRelu => {
                if z > 0.0 {
                    z
                } else {
                    0.01 * z
                }
            }
            Activation::Softplus => softplus(z),
            Activation::Elu => elu(z, 1.0),
            Activation::Selu => 1.050_700_987_355_480_5 * elu(z, 1.673_263_242_354_377_3),
            Activation::Swish => z * sigmoid(z),
            Activation::Mish => z * softplus(z).tanh(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn tensor_and_scalar_definitions_agree() {
        let d = Device::flex();
        let zs = [-3.0f32, -1.0, -0.2, 0.0, 0.5, 2.0];
        for a in Activation::ALL {
            let t = Tensor::<1>::from_data(TensorData::new(zs.to_vec(), [zs.len()]), &d);
            let got = kiln_core::data::to_vec(a.apply(t));
            for (z, g) in zs.iter().zip(got) {
                let want = a.scalar(*z as f64);
                assert!(
                    (g as f64 - want).abs() < 1e-4,
                    "{a:?}({z}) = {g}, want {want}"
                );
            }
        }
    }
}
