//! Generator and discriminator (course deck 3, GANs).
//!
//! The generator G maps noise z ~ N(0, I) to an image G(z) ∈ [−1, 1]^{h×w} (tanh output; real
//! images are scaled p/scale·2 − 1 to match). The discriminator D maps an image to one logit,
//! D(x) = σ(logit) being its probability that x is real.
//!
//! - **DCGAN** (Radford et al. 2016, sized for 28×28): G: z → dense → C₀×(h/4)×(w/4) → BN →
//!   ReLU → 4×4 transposed conv, stride 2 → BN → ReLU → 4×4 transposed conv, stride 2 → tanh.
//!   D: 4×4 conv, stride 2 → LeakyReLU(0.2) → 4×4 conv, stride 2 → BN → LeakyReLU(0.2) →
//!   dense → logit.
//! - **MLP**: G: z → dense layers (LeakyReLU 0.2) → h·w (tanh); D: h·w → dense layers
//!   (LeakyReLU 0.2) → logit.
//!
//! - **Class-conditional** (`conditional = "projection"` or `"auxiliary"`, either kind; Mirza &
//!   Osindero 2014): G reads [z, onehot(y)] for a class y. With `"projection"` (Miyato & Koyama
//!   2018) D's logit gains a class term, logit(x, y) = w·φ(x) + b + e_y·φ(x), where φ(x) are the
//!   features its output layer reads and e_y is a learned embedding of y (one row per class,
//!   starting at zero). With `"auxiliary"` (AC-GAN, Odena et al. 2017) D keeps its plain logit
//!   and gains a second head, class logits a(x) = V·φ(x) + c, trained to name the class of real
//!   and generated images alike; G is trained to make its images named as the class asked for.
//!
//! Weights start as Burn's (and PyTorch's) default, Kaiming-uniform U(−1/√fan_in, 1/√fan_in),
//! or with `init = "normal"` as Radford et al. start them: every weight and bias of the
//! convolutions and dense layers from N(0, 0.02²).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
// One fused flex operation each way (Burn's operations on other backends).
use kiln_kernels::activation::{leaky_relu, tanh};
use kiln_kernels::batchnorm::batch_norm;
use kiln_kernels::linear::linear as dense_layer;
use kiln_kernels::strided::{conv_transpose2d, conv2d};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Dcgan,
    Mlp,
}

/// How the weights start (`params.net.init`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Kaiming-uniform, U(−1/√fan_in, 1/√fan_in): Burn's default and PyTorch's.
    #[default]
    Default,
    /// N(0, 0.02²) for every weight and bias (DCGAN's initialisation).
    Normal,
}

impl Init {
    fn initializer(self) -> Option<Initializer> {
        match self {
            Init::Default => None,
            Init::Normal => Some(Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }),
        }
    }
}

/// `[params.net]` of a GAN config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetParams {
    #[serde(default)]
    pub kind: Kind,
    /// Dimension of the noise z.
    #[serde(default = "default_latent")]
    pub latent: usize,
    /// DCGAN: channels of the generator's 7×7 map and of its middle layer, e.g. `[64, 32]`;
    /// the discriminator uses them reversed. MLP: hidden widths of the generator, e.g.
    /// `[256, 512]`; the discriminator uses them reversed.
    pub widths: Vec<usize>,
    /// The discriminator's widths in its own order, from the image inwards (DCGAN: the channels
    /// of its two convolutions, e.g. `[64, 128]`; MLP: its hidden widths). Default: `widths`
    /// reversed.
    #[serde(default)]
    pub d_widths: Option<Vec<usize>>,
    /// Initial weights: `"default"` (Kaiming-uniform) or `"normal"` (N(0, 0.02²)).
    #[serde(default)]
    pub init: Init,
    /// Condition both networks on the class label (see the module's documentation).
    #[serde(default)]
    pub conditional: Option<Conditioning>,
}

/// How a conditional GAN's discriminator uses the class (`params.net.conditional`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conditioning {
    /// The logit gains e_y·φ(x) (projection discriminator).
    Projection,
    /// A second head names the class (AC-GAN).
    Auxiliary,
}

fn default_latent() -> usize {
    100
}

impl NetParams {
    /// The discriminator's widths, from the image inwards.
    pub fn discriminator_widths(&self) -> Vec<usize> {
        self.d_widths
            .clone()
            .unwrap_or_else(|| self.widths.iter().rev().copied().collect())
    }

    /// How many label columns G reads and D embeds: the data set's class count when
    /// conditional, else 0.
    pub fn label_dims(&self, classes: usize) -> usize {
        if self.conditional.is_some() {
            classes
        } else {
            0
        }
    }

    pub fn check(&self, height: usize, width: usize) -> Result<(), String> {
        if self.latent == 0 {
            return Err("latent: must be at least 1".into());
        }
        match self.kind {
            Kind::Dcgan => {
                if self.widths.len() != 2 || self.widths.contains(&0) {
                    return Err(format!(
                        "widths: a DCGAN takes two channel counts, e.g. [64, 32]; got {:?}",
                        self.widths
                    ));
                }
                if let Some(d) = &self.d_widths
                    && (d.len() != 2 || d.contains(&0))
                {
                    return Err(format!(
                        "d_widths: a DCGAN discriminator takes two channel counts, e.g. [64, 128]; got {d:?}"
                    ));
                }
                if !height.is_multiple_of(4) || !width.is_multiple_of(4) {
                    return Err(format!(
                        "kind: a DCGAN needs sides divisible by 4, the images are {height}×{width} (use kind = \"mlp\")"
                    ));
                }
            }
            Kind::Mlp => {
                if self.widths.is_empty() || self.widths.contains(&0) {
                    return Err("widths: give the hidden widths, each ≥ 1".into());
                }
                if let Some(d) = &self.d_widths
                    && (d.is_empty() || d.contains(&0))
                {
                    return Err("d_widths: give the hidden widths, each ≥ 1".into());
                }
            }
        }
        Ok(())
    }

    pub fn describe(&self, height: usize, width: usize) -> String {
        let net = self.describe_networks(height, width);
        match self.conditional {
            Some(Conditioning::Projection) => {
                format!("class-conditional {net}; D projects a class embedding")
            }
            Some(Conditioning::Auxiliary) => {
                format!("class-conditional {net}; D has an auxiliary class head (AC-GAN)")
            }
            None => net,
        }
    }

    fn describe_networks(&self, height: usize, width: usize) -> String {
        match self.kind {
            Kind::Dcgan => {
                let d = self.discriminator_widths();
                format!(
                    "DCGAN: G z{} → {}×{}×{} → convT {} → convT 1 ({height}×{width}, tanh); D conv {} → conv {} → logit",
                    self.latent,
                    self.widths[0],
                    height / 4,
                    width / 4,
                    self.widths[1],
                    d[0],
                    d[1]
                )
            }
            Kind::Mlp => {
                let g: Vec<String> = self.widths.iter().map(usize::to_string).collect();
                let d: Vec<String> = self
                    .discriminator_widths()
                    .iter()
                    .map(usize::to_string)
                    .collect();
                format!(
                    "MLP GAN: G {}-{}-{} (tanh); D {}-{}-1 (LeakyReLU 0.2)",
                    self.latent,
                    g.join("-"),
                    height * width,
                    height * width,
                    d.join("-")
                )
            }
        }
    }
}

fn convt(c_in: usize, c_out: usize, init: Init, device: &Device) -> ConvTranspose2d {
    let c = ConvTranspose2dConfig::new([c_in, c_out], [4, 4])
        .with_stride([2, 2])
        .with_padding([1, 1]);
    match init.initializer() {
        Some(i) => c.with_initializer(i),
        None => c,
    }
    .init(device) // side → 2·side
}

fn conv(c_in: usize, c_out: usize, init: Init, device: &Device) -> Conv2d {
    let c = Conv2dConfig::new([c_in, c_out], [4, 4])
        .with_stride([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1));
    match init.initializer() {
        Some(i) => c.with_initializer(i),
        None => c,
    }
    .init(device) // side → side / 2
}

fn linear(d_in: usize, d_out: usize, init: Init, device: &Device) -> Linear {
    let c = LinearConfig::new(d_in, d_out);
    match init.initializer() {
        Some(i) => c.with_initializer(i),
        None => c,
    }
    .init(device)
}

#[derive(Module, Debug)]
pub struct Generator {
    dense: Vec<Linear>,
    out: Linear,
    bn: Vec<BatchNorm>,
    deconv: Vec<ConvTranspose2d>,
    #[module(skip)]
    shape: [usize; 3],
    /// The classes it is conditioned on (0: unconditional).
    #[module(skip)]
    classes: usize,
}

#[derive(Module, Debug)]
pub struct Discriminator {
    conv: Vec<Conv2d>,
    bn: Option<BatchNorm>,
    dense: Vec<Linear>,
    out: Linear,
    /// The class embedding e (classes → the output layer's inputs, no bias) of a projection D.
    embed: Option<Linear>,
    /// The class head (the output layer's inputs → class logits) of an auxiliary-classifier D.
    aux: Option<Linear>,
    #[module(skip)]
    shape: [usize; 2],
}

/// One-hot rows `[n, classes]` for `labels`.
pub fn one_hot(labels: &[usize], classes: usize, device: &Device) -> Tensor<2> {
    let mut v = vec![0f32; labels.len() * classes];
    for (row, &y) in labels.iter().enumerate() {
        v[row * classes + y] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [labels.len(), classes]), device)
}

impl Generator {
    /// `classes`: the data set's class count (used when `p.conditional`).
    pub fn new(
        p: &NetParams,
        height: usize,
        width: usize,
        classes: usize,
        device: &Device,
    ) -> Self {
        let classes = p.label_dims(classes);
        let input = p.latent + classes;
        match p.kind {
            Kind::Dcgan => {
                let (c0, c1) = (p.widths[0], p.widths[1]);
                let (h, w) = (height / 4, width / 4);
                Generator {
                    dense: Vec::new(),
                    out: linear(input, c0 * h * w, p.init, device),
                    bn: vec![
                        BatchNormConfig::new(c0).init(device),
                        BatchNormConfig::new(c1).init(device),
                    ],
                    deconv: vec![convt(c0, c1, p.init, device), convt(c1, 1, p.init, device)],
                    shape: [c0, h, w],
                    classes,
                }
            }
            Kind::Mlp => {
                let mut dense = Vec::new();
                let mut d = input;
                for &wd in &p.widths {
                    dense.push(linear(d, wd, p.init, device));
                    d = wd;
                }
                Generator {
                    dense,
                    out: linear(d, height * width, p.init, device),
                    bn: Vec::new(),
                    deconv: Vec::new(),
                    shape: [1, height, width],
                    classes,
                }
            }
        }
    }

    /// The classes it is conditioned on (0: unconditional).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// `[batch, latent]` noise (for a conditional G, `[batch, latent + classes]`: the noise
    /// with the one-hot class beside it) → `[batch, h·w]` images in [−1, 1].
    pub fn forward(&self, z: Tensor<2>) -> Tensor<2> {
        let [b, _] = z.dims();
        if self.deconv.is_empty() {
            let mut x = z;
            for l in &self.dense {
                x = leaky_relu(dense_layer(l, x), 0.2);
            }
            return tanh(dense_layer(&self.out, x));
        }
        let [c0, h, w] = self.shape;
        let x: Tensor<4> = dense_layer(&self.out, z).reshape([b, c0, h, w]);
        let x = relu(batch_norm(&self.bn[0], x));
        let x = relu(batch_norm(
            &self.bn[1],
            conv_transpose2d(&self.deconv[0], x),
        ));
        tanh(conv_transpose2d(&self.deconv[1], x)).flatten(1, 3)
    }
}

impl Generator {
    /// The generator as ONNX operators on `z` ([`forward`](Self::forward)'s input), ending
    /// in intensities (tanh output + 1) / 2 shaped `[batch, 1, h, w]`, named `images`. Batch
    /// norm uses its running averages, as `kiln sample` does.
    pub fn onnx(
        &self,
        g: &mut kiln_core::onnx::Graph,
        z: &str,
        (height, width): (usize, usize),
    ) -> String {
        use kiln_core::onnx::Attr;
        let x = if self.deconv.is_empty() {
            let mut x = z.to_string();
            for (i, l) in self.dense.iter().enumerate() {
                x = g.linear(&format!("dense.{i}"), l, &x);
                x = g.node("LeakyRelu", &[&x], &[Attr::Float("alpha", 0.2)]);
            }
            g.linear("out", &self.out, &x)
        } else {
            let [c0, h, w] = self.shape.map(|d| d as i64);
            let x = g.linear("out", &self.out, z);
            let x = g.reshape(&x, &[-1, c0, h, w]);
            let x = g.batch_norm("bn.0", &self.bn[0], &x);
            let x = g.node("Relu", &[&x], &[]);
            let x = g.conv_transpose("deconv.0", &self.deconv[0], &x);
            let x = g.batch_norm("bn.1", &self.bn[1], &x);
            let x = g.node("Relu", &[&x], &[]);
            g.conv_transpose("deconv.1", &self.deconv[1], &x)
        };
        let x = g.node("Tanh", &[&x], &[]);
        let one = g.constant("one", &[], &[1.0]);
        let half = g.constant("half", &[], &[0.5]);
        let x = g.node("Add", &[&x, &one], &[]);
        let x = g.node("Mul", &[&x, &half], &[]);
        let x = g.reshape(&x, &[-1, 1, height as i64, width as i64]);
        g.node_as("Identity", &[&x], &[], "images")
    }
}

impl Discriminator {
    /// `classes`: the data set's class count (used when `p.conditional`).
    pub fn new(
        p: &NetParams,
        height: usize,
        width: usize,
        classes: usize,
        device: &Device,
    ) -> Self {
        let labels = p.label_dims(classes);
        let projection = p.conditional == Some(Conditioning::Projection);
        let aux = |features: usize| {
            (p.conditional == Some(Conditioning::Auxiliary) && labels > 0)
                .then(|| linear(features, labels, p.init, device))
        };
        let embed = |features: usize| {
            // e starts at zero: D begins as the unconditional D and learns the class term.
            (projection && labels > 0).then(|| {
                LinearConfig::new(labels, features)
                    .with_bias(false)
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            })
        };
        match p.kind {
            Kind::Dcgan => {
                let dw = p.discriminator_widths();
                let (c0, c1) = (dw[0], dw[1]);
                let features = c1 * (height / 4) * (width / 4);
                Discriminator {
                    conv: vec![conv(1, c0, p.init, device), conv(c0, c1, p.init, device)],
                    bn: Some(BatchNormConfig::new(c1).init(device)),
                    dense: Vec::new(),
                    out: linear(features, 1, p.init, device),
                    embed: embed(features),
                    aux: aux(features),
                    shape: [height, width],
                }
            }
            Kind::Mlp => {
                let mut dense = Vec::new();
                let mut d = height * width;
                for wd in p.discriminator_widths() {
                    dense.push(linear(d, wd, p.init, device));
                    d = wd;
                }
                Discriminator {
                    conv: Vec::new(),
                    bn: None,
                    dense,
                    out: linear(d, 1, p.init, device),
                    embed: embed(d),
                    aux: aux(d),
                    shape: [height, width],
                }
            }
        }
    }

    /// `[batch, h·w]` images → `[batch, 1]` logits; a conditional D also takes the images'
    /// classes, one-hot `[batch, classes]`, and adds e_y·φ(x) to each logit.
    pub fn forward(&self, x: Tensor<2>, labels: Option<Tensor<2>>) -> Tensor<2> {
        self.forward_heads(x, labels).0
    }

    /// The logits `[batch, 1]` and, for an auxiliary-classifier D, the class logits
    /// `[batch, classes]`.
    pub fn forward_heads(
        &self,
        x: Tensor<2>,
        labels: Option<Tensor<2>>,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        let phi = self.features(x);
        let classes = self.aux.as_ref().map(|a| a.forward(phi.clone()));
        let logit = dense_layer(&self.out, phi.clone());
        let logit = match (&self.embed, labels) {
            (Some(e), Some(y)) => logit + (e.forward(y) * phi).sum_dim(1),
            _ => logit,
        };
        (logit, classes)
    }

    /// φ(x): what the output layer reads, `[batch, features]`.
    fn features(&self, x: Tensor<2>) -> Tensor<2> {
        let [b, _] = x.dims();
        if self.conv.is_empty() {
            let mut x = x;
            for l in &self.dense {
                x = leaky_relu(dense_layer(l, x), 0.2);
            }
            return x;
        }
        let [h, w] = self.shape;
        let x: Tensor<4> = x.reshape([b, 1, h, w]);
        let x = leaky_relu(conv2d(&self.conv[0], x), 0.2);
        let mut x = conv2d(&self.conv[1], x);
        if let Some(bn) = &self.bn {
            x = batch_norm(bn, x);
        }
        leaky_relu(x, 0.2).flatten(1, 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let dev = Device::flex();
        for (kind, widths) in [(Kind::Dcgan, vec![16, 8]), (Kind::Mlp, vec![32, 64])] {
            let p = NetParams {
                kind,
                latent: 10,
                widths,
                init: Init::Default,
                d_widths: None,
                conditional: None,
            };
            p.check(28, 28).unwrap();
            let g = Generator::new(&p, 28, 28, 10, &dev);
            let d = Discriminator::new(&p, 28, 28, 10, &dev);
            let x = g.forward(Tensor::zeros([3, 10], &dev));
            assert_eq!(x.dims(), [3, 784], "{kind:?}");
            assert_eq!(d.forward(x, None).dims(), [3, 1], "{kind:?}");
        }
        let bad = NetParams {
            kind: Kind::Dcgan,
            latent: 10,
            widths: vec![8],
            init: Init::Default,
            d_widths: None,
            conditional: None,
        };
        assert!(bad.check(28, 28).unwrap_err().starts_with("widths"));
    }

    /// `init = "normal"` draws every weight from N(0, 0.02²); the default is Kaiming-uniform,
    /// bounded by 1/√fan_in.
    #[test]
    fn normal_init_has_standard_deviation_0_02() {
        let dev = Device::flex();
        dev.seed(3);
        let mut p = NetParams {
            kind: Kind::Dcgan,
            latent: 100,
            widths: vec![64, 32],
            init: Init::Normal,
            d_widths: None,
            conditional: None,
        };
        let w = kiln_core::data::to_vec(Generator::new(&p, 28, 28, 10, &dev).out.weight.val());
        let n = w.len() as f64;
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
        let sd = (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-3 && (sd - 0.02).abs() < 1e-3, "{mean} {sd}");
        p.init = Init::Default;
        let w = kiln_core::data::to_vec(Generator::new(&p, 28, 28, 10, &dev).out.weight.val());
        let bound = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(bound <= 0.1 && bound > 0.09, "{bound}"); // 1/√100
    }

    /// A conditional G reads z and the one-hot class; a conditional D adds e_y·φ(x), which
    /// starts at zero (the unconditional logit) and, once e is set, is exactly the dot product.
    #[test]
    fn conditional_networks_read_the_class() {
        let dev = Device::flex();
        dev.seed(4);
        for kind in [Kind::Dcgan, Kind::Mlp] {
            let p = NetParams {
                kind,
                latent: 6,
                widths: vec![8, 4],
                init: Init::Default,
                d_widths: None,
                conditional: Some(Conditioning::Projection),
            };
            assert_eq!(p.label_dims(3), 3);
            assert!(p.describe(28, 28).starts_with("class-conditional"));
            let g = Generator::new(&p, 28, 28, 3, &dev);
            let x = g.forward(Tensor::zeros([2, 9], &dev));
            assert_eq!(x.dims(), [2, 784], "{kind:?}");
            let mut d = Discriminator::new(&p, 28, 28, 3, &dev);
            let y = one_hot(&[0, 2], 3, &dev);
            assert_eq!(
                kiln_core::data::to_vec(y.clone()),
                vec![1., 0., 0., 0., 0., 1.]
            );
            let plain = kiln_core::data::to_vec(d.forward(x.clone(), None));
            assert_eq!(
                kiln_core::data::to_vec(d.forward(x.clone(), Some(y.clone()))),
                plain
            );
            let e = d.embed.take().expect("a conditional D has an embedding");
            let [_, f] = e.weight.dims();
            // e_y = (y + 1)·0.01 in every feature: the class term is (y + 1)·0.01·Σφ.
            let rows: Vec<f32> = (0..3)
                .flat_map(|c| vec![(c + 1) as f32 * 0.01; f])
                .collect();
            let w = Tensor::<2>::from_data(TensorData::new(rows, [3, f]), &dev);
            d.embed = Some(Linear {
                weight: burn::module::Param::from_tensor(w),
                bias: None,
            });
            let phi_sum = kiln_core::data::to_vec(d.features(x.clone()).sum_dim(1));
            let with = kiln_core::data::to_vec(d.forward(x, Some(y)));
            for (i, c) in [0usize, 2].iter().enumerate() {
                let expected = plain[i] + (c + 1) as f32 * 0.01 * phi_sum[i];
                assert!(
                    (with[i] - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                    "{kind:?} {i}"
                );
            }
        }
        let p = NetParams {
            kind: Kind::Dcgan,
            latent: 6,
            widths: vec![8, 4],
            init: Init::Default,
            d_widths: None,
            conditional: None,
        };
        assert_eq!(p.label_dims(3), 0);
        let d = Discriminator::new(&p, 28, 28, 3, &dev);
        assert!(d.embed.is_none() && d.aux.is_none());
        // AC-GAN: no embedding, a class head with one logit per class.
        let p = NetParams {
            conditional: Some(Conditioning::Auxiliary),
            ..p
        };
        assert!(p.describe(28, 28).contains("auxiliary class head"));
        let d = Discriminator::new(&p, 28, 28, 3, &dev);
        assert!(d.embed.is_none());
        let (logit, classes) = d.forward_heads(Tensor::zeros([2, 784], &dev), None);
        assert_eq!(logit.dims(), [2, 1]);
        assert_eq!(classes.expect("class logits").dims(), [2, 3]);
    }
}
