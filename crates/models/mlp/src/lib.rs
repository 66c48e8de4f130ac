//! Multilayer perceptron (course deck 0: MNIST with 784-128-10; course deck 2: XOR; course deck 3: two
//! hidden layers of 100 ReLU units).
//!
//! ŷ = f_L(W_Lᵀ f(… f(W_1ᵀ x + b_1) …) + b_L): the image is flattened to a vector x, every
//! hidden layer applies an affine map and the activation f chosen in config, and the output
//! layer gives logits (softmax / sigmoid are applied by the loss and by `predict`).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use kiln_kernels::linear::linear;
pub mod activation;
use activation::Activation;
use kiln_core::nn::{check_dropout, dropout};
use kiln_vision::{ImageFamily, ImageNet};
use serde::{Deserialize, Serialize};

/// `[params.net]` of an MLP config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpParams {
    /// Widths of the hidden layers, e.g. `[128]` or `[100, 100]`.
    pub hidden: Vec<usize>,
    /// Activation of every hidden layer (one of the eleven in course deck 1).
    #[serde(default)]
    pub activation: Activation,
    /// Dropout probability after every hidden layer (0 = none).
    #[serde(default)]
    pub dropout: f64,
    /// Dropout probability on the input pixels (0 = none; Hinton et al. 2012 use 0.2).
    #[serde(default)]
    pub input_dropout: f64,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub hidden: Vec<Linear>,
    pub output: Linear,
    pub dropout: Dropout,
    pub input_dropout: Dropout,
    #[module(skip)]
    pub activation: Activation,
}

impl Mlp {
    /// A network for `inputs` features: hidden layers of the given widths, then `outputs` logits.
    pub fn new(
        inputs: usize,
        hidden: &[usize],
        outputs: usize,
        activation: Activation,
        dropout: f64,
        input_dropout: f64,
        device: &Device,
    ) -> Self {
        let mut layers = Vec::new();
        let mut width = inputs;
        for &h in hidden {
            layers.push(LinearConfig::new(width, h).init(device)); // out: [batch, h]
            width = h;
        }
        Mlp {
            hidden: layers,
            output: LinearConfig::new(width, outputs).init(device), // out: [batch, outputs]
            dropout: DropoutConfig::new(dropout).init(),
            input_dropout: DropoutConfig::new(input_dropout).init(),
            activation,
        }
    }

    /// `[batch, features]` → `[batch, outputs]`.
    pub fn forward_features(&self, x: Tensor<2>) -> Tensor<2> {
        let mut x = dropout(&self.input_dropout, x);
        for layer in &self.hidden {
            x = dropout(&self.dropout, self.activation.apply(linear(layer, x)));
        }
        linear(&self.output, x)
    }
}

impl ImageNet for Mlp {
    type Params = MlpParams;

    fn build_for(
        p: &MlpParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
        device: &Device,
    ) -> Result<Self, String> {
        if p.hidden.contains(&0) {
            return Err("hidden: layer widths must be at least 1".into());
        }
        check_dropout(&[("dropout", p.dropout), ("input_dropout", p.input_dropout)])?;
        Ok(Mlp::new(
            channels * height * width,
            &p.hidden,
            outputs,
            p.activation,
            p.dropout,
            p.input_dropout,
            device,
        ))
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let [b, c, h, w] = images.dims();
        self.forward_features(images.reshape([b, c * h * w])) // flatten: [batch, c·h·w]
    }

    fn onnx(&self, g: &mut kiln_core::onnx::Graph, x: &str) -> Result<String, String> {
        let op = match self.activation {
            Activation::Relu => Some("Relu"),
            Activation::Sigmoid => Some("Sigmoid"),
            Activation::Tanh => Some("Tanh"),
            Activation::Softsign => Some("Softsign"),
            Activation::Softplus => Some("Softplus"),
            Activation::Linear => None,
            other => return Err(format!("activation {other:?} has no ONNX export")),
        };
        let mut x = g.node("Flatten", &[x], &[kiln_core::onnx::Attr::Int("axis", 1)]);
        for (i, layer) in self.hidden.iter().enumerate() {
            x = g.linear(&format!("hidden.{i}"), layer, &x);
            if let Some(op) = op {
                x = g.node(op, &[&x], &[]);
            }
        }
        Ok(g.linear("output", &self.output, &x))
    }

    fn describe(
        p: &MlpParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
    ) -> String {
        let mut sizes = vec![(channels * height * width).to_string()];
        sizes.extend(p.hidden.iter().map(usize::to_string));
        sizes.push(outputs.to_string());
        let mut notes = vec![format!("{:?} hidden", p.activation)];
        if p.input_dropout > 0.0 {
            notes.push(format!("input dropout {}", p.input_dropout));
        }
        if p.dropout > 0.0 {
            notes.push(format!("dropout {}", p.dropout));
        }
        format!("MLP {} ({})", sizes.join("-"), notes.join(", "))
    }
}

/// The MLP family for the runner's registry.
pub static FAMILY: ImageFamily<Mlp> = ImageFamily::new(
    "mlp",
    "multilayer perceptron: MNIST, Fashion-MNIST, 8×8 digits or XOR; any of the 11 activations",
    "mnist",
);

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::TensorData;
    use kiln_core::data::to_vec;

    fn linear(w: Vec<f32>, inputs: usize, outputs: usize, b: Vec<f32>, d: &Device) -> Linear {
        Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [inputs, outputs]), d)),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [outputs]),
                d,
            ))),
        }
    }

    fn hand_made(
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: f32,
        activation: Activation,
        d: &Device,
    ) -> Mlp {
        let hidden = b1.len();
        let inputs = w1.len() / hidden;
        Mlp {
            hidden: vec![linear(w1, inputs, hidden, b1, d)],
            output: linear(w2, hidden, 1, vec![b2], d),
            dropout: DropoutConfig::new(0.0).init(),
            input_dropout: DropoutConfig::new(0.0).init(),
            activation,
        }
    }

    fn run(m: &Mlp, x: Vec<f32>, rows: usize, d: &Device) -> Vec<f32> {
        let cols = x.len() / rows;
        to_vec(m.forward_features(Tensor::from_data(TensorData::new(x, [rows, cols]), d)))
    }

    /// Course deck 2: W₁ = [[1, 1], [1, 1]], b₁ = [0, −1], ReLU, W₂ = [1, −2]ᵀ, b₂ = 0 computes
    /// XOR exactly: outputs 0, 1, 1, 0 for inputs 00, 01, 10, 11.
    #[test]
    fn hand_set_weights_compute_xor() {
        let d = Device::flex();
        let m = hand_made(
            vec![1.0, 1.0, 1.0, 1.0],
            vec![0.0, -1.0],
            vec![1.0, -2.0],
            0.0,
            Activation::Relu,
            &d,
        );
        let out = run(&m, vec![0., 0., 0., 1., 1., 0., 1., 1.], 4, &d);
        assert_eq!(out, vec![0.0, 1.0, 1.0, 0.0]);
    }

    /// Course deck 1: x = [7, 2], W₁ = [[0.1, 0.7, −0.1], [0.2, −0.4, −0.2]], b₁ = [−1.5, 0.2, 0.8],
    /// W₂ = [0.2, 0.3, 0.4]ᵀ, b₂ = 0.1, linear activations: h = [−0.4, 4.3, −0.3], ŷ = 1.19.
    #[test]
    fn linear_neuron_forward_is_1_19() {
        let d = Device::flex();
        let m = hand_made(
            vec![0.1, 0.7, -0.1, 0.2, -0.4, -0.2],
            vec![-1.5, 0.2, 0.8],
            vec![0.2, 0.3, 0.4],
            0.1,
            Activation::Linear,
            &d,
        );
        let y = run(&m, vec![7.0, 2.0], 1, &d)[0];
        assert!((y - 1.19).abs() < 1e-5, "{y}");
    }

    /// Course deck 1 quiz: x = [1, 2], W₁ᵀ = [[−0.1, 0.3], [0.2, 0.1], [−0.9, −0.4]],
    /// b₁ = [−1.1, 0.1, 0.3], ReLU gives h = [0, 0.5, 0]; W₂ = [0.2, 0.3, 0.4]ᵀ, b₂ = 0.1: ŷ = 0.25.
    #[test]
    fn relu_neuron_forward_is_0_25() {
        let d = Device::flex();
        // Burn stores W as [inputs, outputs]: the transpose of the slide's W₁ᵀ.
        let m = hand_made(
            vec![-0.1, 0.2, -0.9, 0.3, 0.1, -0.4],
            vec![-1.1, 0.1, 0.3],
            vec![0.2, 0.3, 0.4],
            0.1,
            Activation::Relu,
            &d,
        );
        let y = run(&m, vec![1.0, 2.0], 1, &d)[0];
        assert!((y - 0.25).abs() < 1e-5, "{y}");
    }

    #[test]
    fn shapes_and_describe() {
        let d = Device::flex();
        let p = MlpParams {
            hidden: vec![100, 100],
            activation: Activation::Relu,
            dropout: 0.0,
            input_dropout: 0.0,
        };
        let m = Mlp::build(&p, 28, 28, 10, &d).unwrap();
        let y = ImageNet::forward(&m, Tensor::zeros([3, 1, 28, 28], &d));
        assert_eq!(y.dims(), [3, 10]);
        assert_eq!(
            m.num_params(),
            784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
        );
        assert!(Mlp::describe(&p, 1, 28, 28, 10).starts_with("MLP 784-100-100-10"));
        let noisy = MlpParams {
            input_dropout: 0.1,
            ..p.clone()
        };
        assert_eq!(
            Mlp::describe(&noisy, 1, 28, 28, 10),
            "MLP 784-100-100-10 (Relu hidden, input dropout 0.1)"
        );
        let too_noisy = MlpParams {
            input_dropout: 1.0,
            ..p.clone()
        };
        assert!(
            Mlp::build(&too_noisy, 28, 28, 10, &d)
                .unwrap_err()
                .starts_with("input_dropout: must be in [0, 1)")
        );
        assert!(
            Mlp::build(
                &MlpParams {
                    hidden: vec![0],
                    ..p
                },
                28,
                28,
                10,
                &d
            )
            .is_err()
        );
    }
}

/// The MLP's training step on wgpu against flex, from the same weights on the same batch.
/// Compiled with `--features wgpu`.
#[cfg(all(test, feature = "wgpu"))]
#[test]
fn one_step_on_wgpu_matches_flex() {
    let wgpu = kiln_core::BackendName::Wgpu.device().unwrap();
    for activation in [Activation::Sigmoid, Activation::Relu] {
        let params = MlpParams {
            hidden: vec![128, 64],
            activation,
            dropout: 0.0,
            input_dropout: 0.0,
        };
        let (a, b) =
            kiln_vision::parity_steps::<Mlp>(&params, 32, 0.1, std::slice::from_ref(&wgpu));
        kiln_core::train::steps_agree(&a, &b, 1e-4)
            .unwrap_or_else(|e| panic!("{activation:?}: {e}"));
    }
}

/// Data parallel with the MLP: the batch of 32 dealt over two replicas (three: 11 + 11 + 10)
/// gives the update of the whole batch on one device, to 1e-5. On flex the replicas share
/// the one CPU device, so this proves the dealing, the weighting and the summing of the
/// gradients; the wgpu test below crosses real device boundaries.
#[cfg(test)]
#[test]
fn data_parallel_step_matches_one_device() {
    use burn::tensor::Device;
    let params = MlpParams {
        hidden: vec![64, 32],
        activation: Activation::Relu,
        dropout: 0.0,
        input_dropout: 0.0,
    };
    for replicas in [2, 3] {
        let (one, many) =
            kiln_vision::parity_steps::<Mlp>(&params, 32, 0.1, &vec![Device::flex(); replicas]);
        kiln_core::train::steps_agree(&one, &many, 1e-5)
            .unwrap_or_else(|e| panic!("{replicas} replicas: {e}"));
    }
}

/// Data parallel across two distinct wgpu devices (without a GPU: two devices on lavapipe's
/// one adapter, each with its own queue and memory, so every replica and gradient really
/// moves between devices) against one wgpu device with the whole batch, to 1e-5.
#[cfg(all(test, feature = "wgpu"))]
#[test]
fn data_parallel_on_two_wgpu_devices_matches_one() {
    use burn::tensor::{Device, DeviceKind};
    let first = kiln_core::BackendName::Wgpu.device().unwrap();
    let second = Device::wgpu(DeviceKind::Cpu);
    let second = if second == first {
        Device::wgpu(DeviceKind::IntegratedGpu(0))
    } else {
        second
    };
    assert_ne!(first, second);
    let params = MlpParams {
        hidden: vec![64, 32],
        activation: Activation::Relu,
        dropout: 0.0,
        input_dropout: 0.0,
    };
    let all: Vec<usize> = (0..32).collect();
    let steps = kiln_vision::parity_runs::<Mlp>(
        &params,
        32,
        0.1,
        &[
            (&all, &[Device::flex()]),
            (&all, std::slice::from_ref(&first)),
            (&all, &[first.clone(), second]),
        ],
    );
    let (flex, one, two) = (&steps[0], &steps[1], &steps[2]);
    kiln_core::train::steps_agree(one, two, 1e-5).unwrap();
    kiln_core::train::steps_agree(flex, two, 1e-4).unwrap();
}
