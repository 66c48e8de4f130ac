//! Residual networks (He et al. 2015, "Deep Residual Learning"; course deck 3's ResNet50)
//! in torchvision's layout, so that weights move both ways between kiln and PyTorch.
//!
//! A residual block learns a correction F(x) to its input instead of a whole new mapping:
//! out = ReLU(F(x) + shortcut(x)). The shortcut is the identity when the shapes agree, and a
//! 1×1 convolution with stride s and batch norm (a *projection*, torchvision's `downsample`)
//! when the block halves the picture or changes the channel count. Because ∂out/∂x contains
//! the identity, the gradient reaches early layers undiminished however deep the stack.
//!
//! - **basic** block (ResNet-18/34): F = BN(conv3×3(ReLU(BN(conv3×3_s(x))))), `planes`
//!   channels out (expansion 1).
//! - **bottleneck** block (ResNet-50/101/152, torchvision's "v1.5": the stride on the 3×3):
//!   F = BN(conv1×1(ReLU(BN(conv3×3_s(ReLU(BN(conv1×1(x)))))))), squeezing to `planes`
//!   channels and expanding to 4·`planes` (expansion 4).
//!
//! The network: a stem (`conv1`, `bn1`, ReLU, and for ImageNet-sized pictures a 3×3 max-pool
//! of stride 2), four stages `layer1`…`layer4` of `layers[i]` blocks with `width`·2^i planes
//! (stride 1 in the first stage, 2 in the others), a global average pool and the classifier
//! `fc`. Parameter names are torchvision's (`layer1.0.conv1.weight`, `bn1.running_mean`,
//! `layer2.0.downsample.0.weight`), except that Burn calls batch norm's γ, β `gamma`, `beta`
//! and the projection's two parts `downsample.conv` / `downsample.bn`; `torch_names` maps
//! them. Every convolution has no bias, as in torchvision (the batch norm after it has β).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use kiln_core::export::{TorchName, TorchNames};
use kiln_kernels::batchnorm::batch_norm;
use kiln_kernels::conv::conv2d;
/// kiln's stride-1 convolution on flex (Burn's elsewhere and for strides > 1).
use kiln_kernels::linear::linear;
use kiln_vision::{ImageFamily, ImageNet};
use serde::{Deserialize, Serialize};

/// Which residual block the stages are made of.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34).
    #[default]
    Basic,
    /// 1×1, 3×3, 1×1 with 4× the planes out (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block per plane.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The first layers, before the residual stages.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// A 3×3 convolution of stride 1, no pooling: for small pictures (28×28, CIFAR's 32×32).
    #[default]
    Small,
    /// torchvision's: a 7×7 convolution of stride 2 and a 3×3 max-pool of stride 2 (224×224
    /// pictures shrink to 56×56 before `layer1`). Needed to load ImageNet-trained weights.
    Imagenet,
}

/// `[params.net]` of a ResNet config. ResNet-18 is `layers = [2, 2, 2, 2]`, ResNet-34
/// `[3, 4, 6, 3]` (basic blocks), ResNet-50 `[3, 4, 6, 3]` with bottleneck blocks, all at
/// `width = 64`, `stem = "imagenet"`, `in_channels = 3`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetParams {
    #[serde(default)]
    pub block: BlockKind,
    /// Blocks in each of the four stages.
    pub layers: [usize; 4],
    /// Planes of the first stage (64 in torchvision); stage i has width·2^i.
    #[serde(default = "default_width")]
    pub width: usize,
    #[serde(default)]
    pub stem: Stem,
    /// Input channels the first convolution expects: 1 for grey pictures, 3 for RGB (and for
    /// ImageNet weights, which then see a grey picture as the same value in R, G and B).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
}

fn default_width() -> usize {
    64
}

fn default_in_channels() -> usize {
    1
}

/// torchvision's projection shortcut: 1×1 convolution of stride s, then batch norm.
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

/// One residual block (basic when `conv3` is absent, bottleneck otherwise).
#[derive(Module, Debug)]
pub struct Block {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub conv3: Option<Conv2d>,
    pub bn3: Option<BatchNorm>,
    pub downsample: Option<Downsample>,
}

/// A k×k convolution of `stride` without bias, padded by k/2 (torchvision's `conv3x3` /
/// `conv1x1`): out side = ⌊(side + 2·⌊k/2⌋ − k) / stride⌋ + 1.
fn conv(c_in: usize, c_out: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(false)
        .init(device)
}

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

impl Block {
    fn new(kind: BlockKind, c_in: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let c_out = planes * kind.expansion();
        let downsample = (stride != 1 || c_in != c_out).then(|| Downsample {
            conv: conv(c_in, c_out, 1, stride, device),
            bn: bn(c_out, device),
        });
        match kind {
            BlockKind::Basic => Block {
                conv1: conv(c_in, planes, 3, stride, device),
                bn1: bn(planes, device),
                conv2: conv(planes, planes, 3, 1, device),
                bn2: bn(planes, device),
                conv3: None,
                bn3: None,
                downsample,
            },
            BlockKind::Bottleneck => Block {
                conv1: conv(c_in, planes, 1, 1, device),
                bn1: bn(planes, device),
                conv2: conv(planes, planes, 3, stride, device),
                bn2: bn(planes, device),
                conv3: Some(conv(planes, c_out, 1, 1, device)),
                bn3: Some(bn(c_out, device)),
                downsample,
            },
        }
    }

    /// out = ReLU(F(x) + shortcut(x)).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(d) => batch_norm(&d.bn, conv2d(&d.conv, x.clone())),
            None => x.clone(),
        };
        let y = relu(batch_norm(&self.bn1, conv2d(&self.conv1, x)));
        let mut y = batch_norm(&self.bn2, conv2d(&self.conv2, y));
        if let (Some(conv3), Some(bn3)) = (&self.conv3, &self.bn3) {
            y = batch_norm(bn3, conv2d(conv3, relu(y)));
        }
        relu(y + shortcut)
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub maxpool: Option<MaxPool2d>,
    pub layer1: Vec<Block>,
    pub layer2: Vec<Block>,
    pub layer3: Vec<Block>,
    pub layer4: Vec<Block>,
    pub fc: Linear,
}

/// Side after a k×k convolution (or pool) of `stride` padded by `pad`.
fn side_after(side: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    (side + 2 * pad).checked_sub(k).map(|s| s / stride + 1)
}

impl ResNet {
    fn stages(&self) -> [&Vec<Block>; 4] {
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
    }

    /// Channels of the last stage (the classifier's input).
    pub fn features_width(p: &ResNetParams) -> usize {
        p.width * 8 * p.block.expansion()
    }

    /// Global-average-pooled features of the last stage: `[batch, c, h, w]` → `[batch, c']`.
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let want = self.conv1.weight.dims()[1];
        let have = images.dims()[1];
        // A grey picture to an RGB network: the same intensities in every channel.
        let mut x = if have == 1 && want > 1 {
            images.repeat_dim(1, want)
        } else {
            images
        };
        x = relu(batch_norm(&self.bn1, conv2d(&self.conv1, x)));
        if let Some(pool) = &self.maxpool {
            x = pool.forward(x);
        }
        for stage in self.stages() {
            for block in stage {
                x = block.forward(x);
            }
        }
        // Global average pool: mean over every position of each channel.
        let [b, c, _, _] = x.dims();
        x.mean_dim(3).mean_dim(2).reshape([b, c])
    }

    /// (Burn name, torch name, transpose) of every parameter and running average, and the
    /// torch names of the `num_batches_tracked` counters, in torchvision's order.
    fn names(p: &ResNetParams) -> (Vec<(String, String, bool)>, Vec<String>) {
        let mut names = Vec::new();
        let mut counters = Vec::new();
        let conv = |names: &mut Vec<(String, String, bool)>, burn: &str, torch: &str| {
            names.push((format!("{burn}.weight"), format!("{torch}.weight"), false));
        };
        let bn = |names: &mut Vec<(String, String, bool)>,
                  counters: &mut Vec<String>,
                  burn: &str,
                  torch: &str| {
            for (b, t) in [
                ("gamma", "weight"),
                ("beta", "bias"),
                ("running_mean", "running_mean"),
                ("running_var", "running_var"),
            ] {
                names.push((format!("{burn}.{b}"), format!("{torch}.{t}"), false));
            }
            counters.push(format!("{torch}.num_batches_tracked"));
        };
        conv(&mut names, "conv1", "conv1");
        bn(&mut names, &mut counters, "bn1", "bn1");
        let mut c_in = p.width;
        for (s, &blocks) in p.layers.iter().enumerate() {
            let planes = p.width << s;
            for i in 0..blocks {
                let at = format!("layer{}.{i}", s + 1);
                let convs = if p.block == BlockKind::Basic { 2 } else { 3 };
                for j in 1..=convs {
                    conv(
                        &mut names,
                        &format!("{at}.conv{j}"),
                        &format!("{at}.conv{j}"),
                    );
                    bn(
                        &mut names,
                        &mut counters,
                        &format!("{at}.bn{j}"),
                        &format!("{at}.bn{j}"),
                    );
                }
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let c_out = planes * p.block.expansion();
                if stride != 1 || c_in != c_out {
                    conv(
                        &mut names,
                        &format!("{at}.downsample.conv"),
                        &format!("{at}.downsample.0"),
                    );
                    bn(
                        &mut names,
                        &mut counters,
                        &format!("{at}.downsample.bn"),
                        &format!("{at}.downsample.1"),
                    );
                }
                c_in = c_out;
            }
        }
        names.push(("fc.weight".into(), "fc.weight".into(), true));
        names.push(("fc.bias".into(), "fc.bias".into(), false));
        (names, counters)
    }
}

impl ImageNet for ResNet {
    type Params = ResNetParams;

    fn build_for(
        p: &ResNetParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
        device: &Device,
    ) -> Result<Self, String> {
        if p.width == 0 {
            return Err("width: must be at least 1".into());
        }
        if p.layers.contains(&0) {
            return Err(format!(
                "layers: every stage needs at least one block, got {:?}",
                p.layers
            ));
        }
        if !(1..=4).contains(&p.in_channels) {
            return Err(format!(
                "in_channels: 1 (grey) or 3 (RGB), got {}",
                p.in_channels
            ));
        }
        if channels > p.in_channels {
            return Err(format!(
                "in_channels: {} but the images have {channels} channels (RGB); set in_channels = {channels}",
                p.in_channels
            ));
        }
        // The picture must still be at least 1×1 after the stem and three halvings.
        let fits = |side: usize| -> Option<usize> {
            let mut s = match p.stem {
                Stem::Small => side,
                Stem::Imagenet => side_after(side_after(side, 7, 2, 3)?, 3, 2, 1)?,
            };
            for _ in 0..3 {
                s = side_after(s, 3, 2, 1)?;
            }
            (s >= 1).then_some(s)
        };
        if fits(height).is_none() || fits(width).is_none() {
            return Err(format!(
                "stem: a {height}×{width} picture is too small for the {:?} stem and three stride-2 stages",
                p.stem
            ));
        }
        let (conv1, maxpool) = match p.stem {
            Stem::Small => (conv(p.in_channels, p.width, 3, 1, device), None),
            Stem::Imagenet => (
                conv(p.in_channels, p.width, 7, 2, device),
                Some(
                    MaxPool2dConfig::new([3, 3])
                        .with_strides([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(),
                ),
            ),
        };
        let mut c_in = p.width;
        let mut stages: Vec<Vec<Block>> = Vec::new();
        for (s, &blocks) in p.layers.iter().enumerate() {
            let planes = p.width << s;
            let stage = (0..blocks)
                .map(|i| {
                    let stride = if s > 0 && i == 0 { 2 } else { 1 };
                    let block = Block::new(p.block, c_in, planes, stride, device);
                    c_in = planes * p.block.expansion();
                    block
                })
                .collect();
            stages.push(stage);
        }
        let mut stages = stages.into_iter();
        let mut next = || stages.next().unwrap_or_default();
        Ok(ResNet {
            conv1,
            bn1: bn(p.width, device),
            maxpool,
            layer1: next(),
            layer2: next(),
            layer3: next(),
            layer4: next(),
            fc: LinearConfig::new(Self::features_width(p), outputs).init(device),
        })
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        linear(&self.fc, self.features(images))
    }

    fn forward_features(&self, images: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let features = self.features(images);
        (linear(&self.fc, features.clone()), features)
    }

    /// Conv/BatchNormalization/Relu as in [`Block::forward`], Add for the shortcut,
    /// GlobalAveragePool, Flatten, Gemm. A grey picture into an RGB network is repeated over
    /// the channels (Concat).
    fn onnx(&self, g: &mut kiln_core::onnx::Graph, x: &str) -> Result<String, String> {
        let e = |e: anyhow::Error| e.to_string();
        let want = self.conv1.weight.dims()[1];
        let mut x = x.to_string();
        if want > 1 && g.input_shape().first() == Some(&1) {
            let copies = vec![x.as_str(); want];
            x = g.node("Concat", &copies, &[kiln_core::onnx::Attr::Int("axis", 1)]);
        }
        x = g.conv("conv1", &self.conv1, &x).map_err(e)?;
        x = g.batch_norm("bn1", &self.bn1, &x);
        x = g.node("Relu", &[&x], &[]);
        if let Some(pool) = &self.maxpool {
            x = g.max_pool(pool, &x).map_err(e)?;
        }
        for (s, stage) in self.stages().iter().enumerate() {
            for (i, b) in stage.iter().enumerate() {
                let at = format!("layer{}.{i}", s + 1);
                let shortcut = match &b.downsample {
                    Some(d) => {
                        let y = g
                            .conv(&format!("{at}.downsample.0"), &d.conv, &x)
                            .map_err(e)?;
                        g.batch_norm(&format!("{at}.downsample.1"), &d.bn, &y)
                    }
                    None => x.clone(),
                };
                let mut y = g.conv(&format!("{at}.conv1"), &b.conv1, &x).map_err(e)?;
                y = g.batch_norm(&format!("{at}.bn1"), &b.bn1, &y);
                y = g.node("Relu", &[&y], &[]);
                y = g.conv(&format!("{at}.conv2"), &b.conv2, &y).map_err(e)?;
                y = g.batch_norm(&format!("{at}.bn2"), &b.bn2, &y);
                if let (Some(conv3), Some(bn3)) = (&b.conv3, &b.bn3) {
                    y = g.node("Relu", &[&y], &[]);
                    y = g.conv(&format!("{at}.conv3"), conv3, &y).map_err(e)?;
                    y = g.batch_norm(&format!("{at}.bn3"), bn3, &y);
                }
                y = g.node("Add", &[&y, &shortcut], &[]);
                x = g.node("Relu", &[&y], &[]);
            }
        }
        x = g.node("GlobalAveragePool", &[&x], &[]);
        x = g.node("Flatten", &[&x], &[kiln_core::onnx::Attr::Int("axis", 1)]);
        Ok(g.linear("fc", &self.fc, &x))
    }

    fn classifier() -> &'static str {
        "fc"
    }

    fn torch_names(p: &ResNetParams) -> Option<TorchNames> {
        let (names, counters) = ResNet::names(p);
        Some(TorchNames {
            names: names
                .into_iter()
                .map(|(burn, name, transpose)| (burn, TorchName { name, transpose }))
                .collect(),
            counters,
            ..TorchNames::default()
        })
    }

    fn describe(
        p: &ResNetParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
    ) -> String {
        let (kind, convs) = match p.block {
            BlockKind::Basic => ("basic", 2),
            BlockKind::Bottleneck => ("bottleneck", 3),
        };
        let depth = 2 + p.layers.iter().sum::<usize>() * convs;
        let stem = match p.stem {
            Stem::Small => "small",
            Stem::Imagenet => "imagenet",
        };
        format!(
            "ResNet-{depth} ({kind} blocks {:?}, width {}, {stem} stem, {} input channels) on {}, fc{outputs}",
            p.layers,
            p.width,
            p.in_channels,
            kiln_vision::input_size(channels, height, width),
        )
    }
}

/// The ResNet family for the runner's registry.
pub static FAMILY: ImageFamily<ResNet> = ImageFamily::new(
    "resnet",
    "residual network (torchvision's ResNet layout, basic or bottleneck blocks); MNIST, Fashion-MNIST, digits or your own images",
    "fashion-mnist",
);

#[cfg(test)]
mod tests;
