//! An Inception-style network (Szegedy et al. 2015, GoogLeNet; course deck 3's InceptionV3 is
//! its descendant), sized for small pictures.
//!
//! An Inception block looks at the same input at several scales at once and lets training
//! decide which matters: four branches side by side, their outputs concatenated along the
//! channels,
//!
//! out = concat( B(1×1)(x), B(3×3)(B(1×1)(x)), B(3×3)(B(3×3)(B(1×1)(x))), B(1×1)(maxpool₃ₓ₃(x)) ),
//!
//! where B(k×k) is torchvision's `BasicConv2d`: convolution without bias → batch norm → ReLU.
//! The 1×1 convolutions in front of the larger ones reduce the channels first (the
//! "bottleneck" that keeps the block cheap); two 3×3 convolutions see a 5×5 field for less
//! arithmetic than one 5×5 (InceptionV3's factorisation). A block of width w gives each branch
//! w/4 output channels and each reduction w/8.
//!
//! The network: a 3×3 stem B(3×3) of `stem` channels, `stages` of blocks with a 2×2 max-pool
//! between stages, a global average pool and the classifier `fc`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use kiln_core::onnx::{Attr, Graph};
use kiln_kernels::linear::linear;
use kiln_vision::{ImageFamily, ImageNet};
use serde::{Deserialize, Serialize};

/// `[params.net]` of an Inception config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InceptionParams {
    /// Channels of the 3×3 stem convolution.
    #[serde(default = "default_stem")]
    pub stem: usize,
    /// Output channels of every block, stage by stage (multiples of 8), with a 2×2 max-pool
    /// between stages: e.g. `[[64, 64], [128, 128]]`.
    pub stages: Vec<Vec<usize>>,
}

fn default_stem() -> usize {
    32
}

/// torchvision's `BasicConv2d`: convolution without bias, batch norm, ReLU.
#[derive(Module, Debug)]
pub struct BasicConv {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl BasicConv {
    fn new(c_in: usize, c_out: usize, k: usize, device: &Device) -> Self {
        let p = k / 2;
        BasicConv {
            conv: Conv2dConfig::new([c_in, c_out], [k, k])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(c_out).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu(self.bn.forward(kiln_kernels::conv::conv2d(&self.conv, x)))
    }

    fn onnx(&self, g: &mut Graph, name: &str, x: &str) -> Result<String, String> {
        let y = g
            .conv(&format!("{name}.conv"), &self.conv, x)
            .map_err(|e| e.to_string())?;
        let y = g.batch_norm(&format!("{name}.bn"), &self.bn, &y);
        Ok(g.node("Relu", &[&y], &[]))
    }
}

/// Four branches whose outputs are concatenated along the channels.
#[derive(Module, Debug)]
pub struct InceptionBlock {
    pub branch1: BasicConv,
    pub branch2: Vec<BasicConv>,
    pub branch3: Vec<BasicConv>,
    pub pool: MaxPool2d,
    pub branch4: BasicConv,
}

impl InceptionBlock {
    fn new(c_in: usize, width: usize, device: &Device) -> Self {
        let (out, reduce) = (width / 4, width / 8);
        InceptionBlock {
            branch1: BasicConv::new(c_in, out, 1, device),
            branch2: vec![
                BasicConv::new(c_in, reduce, 1, device),
                BasicConv::new(reduce, out, 3, device),
            ],
            branch3: vec![
                BasicConv::new(c_in, reduce, 1, device),
                BasicConv::new(reduce, out, 3, device),
                BasicConv::new(out, out, 3, device),
            ],
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([1, 1])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            branch4: BasicConv::new(c_in, out, 1, device),
        }
    }

    /// `[b, c, h, w]` → `[b, width, h, w]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let chain = |layers: &[BasicConv], x: Tensor<4>| layers.iter().fold(x, |x, l| l.forward(x));
        Tensor::cat(
            vec![
                self.branch1.forward(x.clone()),
                chain(&self.branch2, x.clone()),
                chain(&self.branch3, x.clone()),
                self.branch4.forward(self.pool.forward(x)),
            ],
            1,
        )
    }

    fn onnx(&self, g: &mut Graph, name: &str, x: &str) -> Result<String, String> {
        let b1 = self.branch1.onnx(g, &format!("{name}.branch1"), x)?;
        let mut b2 = x.to_string();
        for (i, l) in self.branch2.iter().enumerate() {
            b2 = l.onnx(g, &format!("{name}.branch2.{i}"), &b2)?;
        }
        let mut b3 = x.to_string();
        for (i, l) in self.branch3.iter().enumerate() {
            b3 = l.onnx(g, &format!("{name}.branch3.{i}"), &b3)?;
        }
        let pooled = g.max_pool(&self.pool, x).map_err(|e| e.to_string())?;
        let b4 = self.branch4.onnx(g, &format!("{name}.branch4"), &pooled)?;
        Ok(g.node("Concat", &[&b1, &b2, &b3, &b4], &[Attr::Int("axis", 1)]))
    }
}

#[derive(Module, Debug)]
pub struct Inception {
    pub stem: BasicConv,
    pub stages: Vec<Vec<InceptionBlock>>,
    pub pool: MaxPool2d,
    pub fc: Linear,
}

impl Inception {
    fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = self.stem.forward(images);
        for (s, stage) in self.stages.iter().enumerate() {
            if s > 0 {
                x = self.pool.forward(x);
            }
            for block in stage {
                x = block.forward(x);
            }
        }
        let [b, c, _, _] = x.dims();
        x.mean_dim(3).mean_dim(2).reshape([b, c])
    }
}

impl ImageNet for Inception {
    type Params = InceptionParams;

    fn build_for(
        p: &InceptionParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
        device: &Device,
    ) -> Result<Self, String> {
        if p.stem == 0 {
            return Err("stem: at least one channel".into());
        }
        if p.stages.is_empty() || p.stages.iter().any(|s| s.is_empty()) {
            return Err("stages: at least one stage, each with at least one block".into());
        }
        if let Some(w) = p.stages.iter().flatten().find(|w| **w == 0 || *w % 8 != 0) {
            return Err(format!(
                "stages: block widths must be multiples of 8, got {w}"
            ));
        }
        let halvings = p.stages.len() - 1;
        if (height >> halvings) == 0 || (width >> halvings) == 0 {
            return Err(format!(
                "stages: {} stages halve a {height}×{width} picture to nothing",
                p.stages.len()
            ));
        }
        let mut c_in = p.stem;
        let stages = p
            .stages
            .iter()
            .map(|stage| {
                stage
                    .iter()
                    .map(|&w| {
                        let block = InceptionBlock::new(c_in, w, device);
                        c_in = w;
                        block
                    })
                    .collect()
            })
            .collect();
        Ok(Inception {
            stem: BasicConv::new(channels, p.stem, 3, device),
            stages,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc: LinearConfig::new(c_in, outputs).init(device),
        })
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        linear(&self.fc, self.features(images))
    }

    fn forward_features(&self, images: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let f = self.features(images);
        (linear(&self.fc, f.clone()), f)
    }

    fn classifier() -> &'static str {
        "fc"
    }

    fn onnx(&self, g: &mut Graph, x: &str) -> Result<String, String> {
        let mut x = self.stem.onnx(g, "stem", x)?;
        for (s, stage) in self.stages.iter().enumerate() {
            if s > 0 {
                x = g.max_pool(&self.pool, &x).map_err(|e| e.to_string())?;
            }
            for (i, block) in stage.iter().enumerate() {
                x = block.onnx(g, &format!("stages.{s}.{i}"), &x)?;
            }
        }
        x = g.node("GlobalAveragePool", &[&x], &[]);
        x = g.node("Flatten", &[&x], &[Attr::Int("axis", 1)]);
        Ok(g.linear("fc", &self.fc, &x))
    }

    fn describe(
        p: &InceptionParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
    ) -> String {
        let stages: Vec<String> = p
            .stages
            .iter()
            .map(|s| {
                s.iter()
                    .map(|w| format!("inc{w}"))
                    .collect::<Vec<_>>()
                    .join("-")
            })
            .collect();
        format!(
            "Inception {}-stem{}-{}-avgpool-fc{outputs}",
            kiln_vision::input_size(channels, height, width),
            p.stem,
            stages.join("-pool-")
        )
    }
}

/// The Inception family for the runner's registry.
pub static INCEPTION: ImageFamily<Inception> = ImageFamily::new(
    "inception",
    "Inception-style network: blocks of 1×1, 3×3, double 3×3 and pooled branches side by side",
    "fashion-mnist",
);

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use kiln_core::data::to_vec;

    /// A block of width w concatenates four branches of w/4 channels at the input's size;
    /// the network ends in [batch, classes]; bad sizes are named.
    #[test]
    fn shapes() {
        let d = Device::flex();
        let p = InceptionParams {
            stem: 16,
            stages: vec![vec![32, 32], vec![64]],
        };
        let net = Inception::build(&p, 12, 12, 10, &d).unwrap();
        let x = Tensor::<4>::random([2, 16, 12, 12], Distribution::Normal(0.0, 1.0), &d);
        let y = net.stages[0][0].forward(x.clone());
        assert_eq!(y.dims(), [2, 32, 12, 12]);
        // The first 8 channels are branch 1 alone.
        let b1 = net.stages[0][0].branch1.forward(x);
        let head = y.slice([0..2, 0..8, 0..12, 0..12]);
        assert_eq!(to_vec(head), to_vec(b1));
        let images = Tensor::<4>::random([3, 1, 12, 12], Distribution::Normal(0.0, 1.0), &d);
        assert_eq!(ImageNet::forward(&net, images).dims(), [3, 10]);
        assert_eq!(net.fc.weight.dims(), [64, 10]);
        let odd = InceptionParams {
            stem: 16,
            stages: vec![vec![36]],
        };
        assert!(
            Inception::build(&odd, 12, 12, 10, &d)
                .unwrap_err()
                .contains("multiples of 8")
        );
    }
}
