//! The encoder–decoder network and its two losses (course deck 3, generative models).
//!
//! Encoder: x ∈ \[0,1\]^D → h = f(x) → code. An autoencoder's code is z = W_μ h + b_μ. A VAE's
//! encoder gives a mean and a log-variance per code dimension, μ = W_μ h + b_μ and
//! log σ² = W_σ h + b_σ, and the code is sampled with the reparameterisation trick
//!
//! z = μ + σ ⊙ ε,  ε ~ N(0, I),
//!
//! so that ∂z/∂μ = 1 and ∂z/∂σ = ε and backpropagation reaches the encoder through the sample.
//! Decoder: z → g(z) = logits l ∈ ℝ^D, and x̂ = sigmoid(l).
//!
//! Loss per image (what PyTorch's `examples/vae` reports, divided by the batch size):
//!
//! - reconstruction, binary cross-entropy summed over the D pixels:
//!   BCE(x, l) = Σ_d [softplus(l_d) − x_d·l_d] = −Σ_d [x_d log x̂_d + (1 − x_d) log(1 − x̂_d)];
//! - VAE only, the KL divergence of q(z|x) = N(μ, σ²) from the prior N(0, I):
//!   KL = −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²).
//!
//! The autoencoder minimises BCE; the VAE minimises BCE + KL (the negative evidence lower bound).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use kiln_kernels::linear::linear;
use kiln_kernels::strided::{conv_transpose2d, conv2d};
use serde::{Deserialize, Serialize};

/// Dense layers, or strided convolutions (encoder) and transposed convolutions (decoder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Dense,
    Conv,
}

/// `[params.net]` of an autoencoder or VAE config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetParams {
    #[serde(default)]
    pub kind: Kind,
    /// Dense: widths of the encoder's hidden layers (the decoder mirrors them), e.g. `[400]`.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Conv: channels of the stride-2 convolutions (each halves the side), e.g. `[32, 64]`.
    #[serde(default = "default_channels")]
    pub channels: Vec<usize>,
    /// Dimension of the code z (2 draws a latent map).
    pub latent: usize,
}

fn default_hidden() -> Vec<usize> {
    vec![400]
}

fn default_channels() -> Vec<usize> {
    vec![32, 64]
}

impl NetParams {
    /// Reject shapes the network cannot be built with; the message names the field.
    pub fn check(&self, height: usize, width: usize) -> Result<(), String> {
        if self.latent == 0 {
            return Err("latent: must be at least 1".into());
        }
        match self.kind {
            Kind::Dense if self.hidden.contains(&0) => {
                Err("hidden: layer widths must be at least 1".into())
            }
            Kind::Conv => {
                if self.channels.is_empty() || self.channels.contains(&0) {
                    return Err("channels: give at least one channel count, each ≥ 1".into());
                }
                let f = 1 << self.channels.len();
                if !height.is_multiple_of(f) || !width.is_multiple_of(f) {
                    return Err(format!(
                        "channels: {} stride-2 layers need sides divisible by {f}, the images are {height}×{width}",
                        self.channels.len()
                    ));
                }
                Ok(())
            }
            Kind::Dense => Ok(()),
        }
    }

    pub fn describe(&self, height: usize, width: usize, variational: bool) -> String {
        let d = height * width;
        let code = if variational {
            format!("(μ, log σ²) {}", self.latent)
        } else {
            self.latent.to_string()
        };
        match self.kind {
            Kind::Dense => {
                let enc: Vec<String> = self.hidden.iter().map(usize::to_string).collect();
                let dec: Vec<String> = self.hidden.iter().rev().map(usize::to_string).collect();
                format!(
                    "dense {d}-{}-{code}-{}-{d} (ReLU, sigmoid output)",
                    enc.join("-"),
                    dec.join("-")
                )
            }
            Kind::Conv => format!(
                "conv {}×{} → conv {:?} (4×4, stride 2, ReLU) → {code} → transposed conv back (sigmoid output)",
                height, width, self.channels
            ),
        }
    }
}

impl NetParams {
    /// The names of `scripts/reference/pytorch_vae.py`'s `VAE` (PyTorch's examples/vae:
    /// fc1, fc21 = μ, fc22 = log σ², fc3, fc4), for a dense VAE of one hidden layer — the shape
    /// the twin has; `None` for any other network. Linear weights are transposed to PyTorch's
    /// [out, in].
    pub fn torch_names(&self, variational: bool) -> Option<kiln_core::export::TorchNames> {
        use kiln_core::export::TorchNames;
        if self.kind != Kind::Dense || self.hidden.len() != 1 || !variational {
            return None;
        }
        let mut t = TorchNames::default();
        for (burn, torch) in [
            ("enc_dense.0", "fc1"),
            ("mu", "fc21"),
            ("log_var", "fc22"),
            ("dec_dense.0", "fc3"),
            ("dec_out", "fc4"),
        ] {
            t.linear(burn, torch);
        }
        Some(t)
    }
}

/// Encoder and decoder. Dense layers or convolutions, per [`Kind`]; `log_var` only in a VAE.
#[derive(Module, Debug)]
pub struct AutoencoderNet {
    enc_dense: Vec<Linear>,
    enc_conv: Vec<Conv2d>,
    mu: Linear,
    log_var: Option<Linear>,
    dec_dense: Vec<Linear>,
    dec_conv: Vec<ConvTranspose2d>,
    /// Dense: last hidden layer → pixels. Conv: code → the smallest feature map.
    dec_out: Linear,
    #[module(skip)]
    geometry: Geometry,
}

/// Shapes the forward pass needs besides the weights.
#[derive(Debug, Clone)]
struct Geometry {
    height: usize,
    width: usize,
    /// Conv: channels and side of the smallest feature map.
    bottleneck: (usize, usize, usize),
}

/// What the encoder gives: μ (the code) and, in a VAE, log σ².
pub struct Encoded {
    pub mu: Tensor<2>,
    pub log_var: Option<Tensor<2>>,
}

impl AutoencoderNet {
    pub fn new(
        p: &NetParams,
        height: usize,
        width: usize,
        variational: bool,
        device: &Device,
    ) -> Self {
        let d = height * width;
        let (mut enc_dense, mut enc_conv, mut dec_dense, mut dec_conv) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (features, dec_out, bottleneck);
        match p.kind {
            Kind::Dense => {
                let mut w = d;
                for &h in &p.hidden {
                    enc_dense.push(LinearConfig::new(w, h).init(device));
                    w = h;
                }
                features = w;
                let mut w = p.latent;
                for &h in p.hidden.iter().rev() {
                    dec_dense.push(LinearConfig::new(w, h).init(device));
                    w = h;
                }
                dec_out = LinearConfig::new(w, d).init(device);
                bottleneck = (0, 0, 0);
            }
            Kind::Conv => {
                let mut c_in = 1;
                let conv = |c_in, c_out| {
                    Conv2dConfig::new([c_in, c_out], [4, 4])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device)
                };
                for &c in &p.channels {
                    enc_conv.push(conv(c_in, c)); // side → side / 2
                    c_in = c;
                }
                let f = 1 << p.channels.len();
                let (h, w) = (height / f, width / f);
                features = c_in * h * w;
                bottleneck = (c_in, h, w);
                dec_out = LinearConfig::new(p.latent, features).init(device);
                let mut outs: Vec<usize> = p.channels.iter().rev().skip(1).copied().collect();
                outs.push(1);
                for c in outs {
                    dec_conv.push(
                        ConvTranspose2dConfig::new([c_in, c], [4, 4])
                            .with_stride([2, 2])
                            .with_padding([1, 1])
                            .init(device), // side → 2·side
                    );
                    c_in = c;
                }
            }
        }
        AutoencoderNet {
            enc_dense,
            enc_conv,
            mu: LinearConfig::new(features, p.latent).init(device),
            log_var: variational.then(|| LinearConfig::new(features, p.latent).init(device)),
            dec_dense,
            dec_conv,
            dec_out,
            geometry: Geometry {
                height,
                width,
                bottleneck,
            },
        }
    }

    pub fn latent(&self) -> usize {
        self.mu.weight.dims()[1]
    }

    pub fn variational(&self) -> bool {
        self.log_var.is_some()
    }

    /// `[batch, D]` intensities → μ (and log σ²), each `[batch, latent]`.
    pub fn encode(&self, x: Tensor<2>) -> Encoded {
        let [b, _] = x.dims();
        let h = if self.enc_conv.is_empty() {
            let mut h = x;
            for l in &self.enc_dense {
                h = relu(linear(l, h));
            }
            h
        } else {
            let g = &self.geometry;
            let mut h: Tensor<4> = x.reshape([b, 1, g.height, g.width]);
            for c in &self.enc_conv {
                h = relu(conv2d(c, h));
            }
            h.flatten(1, 3)
        };
        Encoded {
            mu: linear(&self.mu, h.clone()),
            log_var: self.log_var.as_ref().map(|l| linear(l, h)),
        }
    }

    /// `[batch, latent]` codes → `[batch, D]` logits l (the image is sigmoid(l)).
    pub fn decode(&self, z: Tensor<2>) -> Tensor<2> {
        let [b, _] = z.dims();
        if self.dec_conv.is_empty() {
            let mut h = z;
            for l in &self.dec_dense {
                h = relu(linear(l, h));
            }
            return linear(&self.dec_out, h);
        }
        let (c, hh, ww) = self.geometry.bottleneck;
        let mut h: Tensor<4> = relu(linear(&self.dec_out, z)).reshape([b, c, hh, ww]);
        let last = self.dec_conv.len() - 1;
        for (i, t) in self.dec_conv.iter().enumerate() {
            h = conv_transpose2d(t, h);
            if i < last {
                h = relu(h);
            }
        }
        h.flatten(1, 3)
    }
}

impl AutoencoderNet {
    /// The decoder as ONNX operators on `z` (`[batch, latent]`): the layers of
    /// [`decode`](Self::decode), then Sigmoid, reshaped to `[batch, 1, h, w]` intensities.
    pub fn decoder_onnx(&self, g: &mut kiln_core::onnx::Graph, z: &str) -> String {
        let geo = &self.geometry;
        let logits = if self.dec_conv.is_empty() {
            let mut h = z.to_string();
            for (i, l) in self.dec_dense.iter().enumerate() {
                h = g.linear(&format!("dec_dense.{i}"), l, &h);
                h = g.node("Relu", &[&h], &[]);
            }
            g.linear("dec_out", &self.dec_out, &h)
        } else {
            let (c, hh, ww) = geo.bottleneck;
            let h = g.linear("dec_out", &self.dec_out, z);
            let h = g.node("Relu", &[&h], &[]);
            let mut h = g.reshape(&h, &[-1, c as i64, hh as i64, ww as i64]);
            let last = self.dec_conv.len() - 1;
            for (i, t) in self.dec_conv.iter().enumerate() {
                h = g.conv_transpose(&format!("dec_conv.{i}"), t, &h);
                if i < last {
                    h = g.node("Relu", &[&h], &[]);
                }
            }
            h
        };
        let x = g.node("Sigmoid", &[&logits], &[]);
        let shape = [-1, 1, geo.height as i64, geo.width as i64];
        let name = g.reshape(&x, &shape);
        g.node_as("Identity", &[&name], &[], "images")
    }
}

/// BCE(x, l) = Σ_d [softplus(l_d) − x_d·l_d] per image: `[batch, D]` → `[batch]`.
///
/// On flex one fused kernel each way ([`kiln_core::flex_ops::bce_with_logits_rows`]);
/// elsewhere Burn's operations, with softplus(l) as −log σ(−l).
pub fn bce_per_image(logits: Tensor<2>, x: Tensor<2>) -> Tensor<1> {
    kiln_core::flex_ops::bce_with_logits_rows(logits, x)
}

/// KL(N(μ, σ²) ‖ N(0, I)) = −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²) per image: `[batch]`.
pub fn kl_per_image(mu: Tensor<2>, log_var: Tensor<2>) -> Tensor<1> {
    let inner = log_var.clone().add_scalar(1.0) - mu.powi_scalar(2) - log_var.exp();
    inner.sum_dim(1).squeeze_dim(1).mul_scalar(-0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use kiln_core::data::to_vec;

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), &Device::flex())
    }

    #[test]
    fn kl_matches_its_closed_form() {
        // μ = (1, −2), log σ² = (0, ln 4): KL = ½ Σ (σ² + μ² − 1 − log σ²)
        // = ½[(1 + 1 − 1 − 0) + (4 + 4 − 1 − ln 4)] = ½(1 + 7 − ln 4).
        let mu = t2(vec![1.0, -2.0, 0.0, 0.0], [2, 2]);
        let lv = t2(vec![0.0, 4f32.ln(), 0.0, 0.0], [2, 2]);
        let kl = to_vec(kl_per_image(mu, lv));
        let expected = 0.5 * (1.0 + 7.0 - 4f32.ln());
        assert!((kl[0] - expected).abs() < 1e-5, "{kl:?} vs {expected}");
        // μ = 0, σ = 1 is the prior itself.
        assert!(kl[1].abs() < 1e-7);
    }

    #[test]
    fn bce_matches_the_probability_form() {
        let l = vec![2.0f32, -1.0, 0.0, 30.0];
        let x = vec![1.0f32, 0.25, 0.5, 0.0];
        let got = to_vec(bce_per_image(t2(l.clone(), [1, 4]), t2(x.clone(), [1, 4])))[0];
        let expected: f32 = l
            .iter()
            .zip(&x)
            .map(|(&l, &x)| {
                let p = 1.0 / (1.0 + (-l).exp());
                // log(1 − p) for large l computed as −l − log(1 + e^{−l}).
                let log1m = -l - (-l).exp().ln_1p();
                -(x * p.ln() + (1.0 - x) * log1m)
            })
            .sum();
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
    }

    #[test]
    fn shapes_dense_and_conv() {
        let dev = Device::flex();
        for kind in [Kind::Dense, Kind::Conv] {
            let p = NetParams {
                kind,
                hidden: vec![16],
                channels: vec![4, 8],
                latent: 3,
            };
            p.check(28, 28).unwrap();
            let net = AutoencoderNet::new(&p, 28, 28, true, &dev);
            let x = Tensor::<2>::zeros([5, 784], &dev);
            let e = net.encode(x);
            assert_eq!(e.mu.dims(), [5, 3]);
            assert_eq!(e.log_var.unwrap().dims(), [5, 3]);
            assert_eq!(net.decode(e.mu).dims(), [5, 784], "{kind:?}");
        }
        let bad = NetParams {
            kind: Kind::Conv,
            hidden: vec![],
            channels: vec![4, 8, 16],
            latent: 2,
        };
        assert!(bad.check(28, 28).unwrap_err().starts_with("channels"));
    }
}
