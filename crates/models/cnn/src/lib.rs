//! Convolutional network (course deck 3): blocks of convolution → (batch norm) → ReLU → 2×2
//! max-pool, then dropout and a dense head.
//!
//! A convolution slides k×k filters over the image: out\[c\](y, x) = b_c + Σ_{c', i, j}
//! W[c, c', i, j] · in[c'](y + i, x + j). "Same" padding keeps the size (pads k/2 zeros),
//! "valid" shrinks it by k − 1. Max-pooling keeps the largest value of every 2×2 window,
//! halving each side.
//!
//! Batch normalisation (optional, per channel c over the batch and all positions):
//! x̂ = (x − μ_B) / √(σ²_B + ε), out = γ_c·x̂ + β_c. Training uses the batch's μ_B, σ²_B and
//! keeps running averages of them, which evaluation and prediction use instead.
//!
//! On the flex backend the convolutions and each block's batch norm → ReLU → pool run as
//! kiln's own operations with their own backward passes ([`flex_ops`]; about twice as fast as
//! Burn's, see docs/performance.md), the same values and gradients as Burn's. Other backends run
//! Burn's operations, except the first convolution: its input is the image (no gradient
//! needed), so [`conv2d_im2col`] computes it as one batched matrix product.
//! ReLU is applied after the pool: max-pooling and ReLU commute (ReLU is increasing), so
//! relu(pool(x)) = pool(relu(x)) on a quarter of the values.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use kiln_core::nn::{check_dropout, dropout};
use kiln_kernels::linear::linear;
use kiln_vision::{ImageFamily, ImageNet};
use serde::{Deserialize, Serialize};

use flex_ops::block_tail;

pub mod inception;
pub use inception::INCEPTION;
pub use kiln_kernels::conv as flex_ops;
pub use kiln_kernels::conv::conv2d_im2col;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Zero-pad so the output has the input's size.
    Same,
    /// No padding: the output shrinks by kernel − 1.
    #[default]
    Valid,
}

/// `[params.net]` of a CNN config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnParams {
    /// Filters of each convolution block, e.g. `[32, 64]`.
    pub conv: Vec<usize>,
    /// Kernel side k (k×k filters).
    #[serde(default = "default_kernel")]
    pub kernel: usize,
    /// Convolutions in each block before its pool, each followed by (batch norm and) ReLU:
    /// 1 is the classic LeNet-style block, 2 or 3 VGG's stacks of 3×3 convolutions.
    #[serde(default = "default_per_block")]
    pub per_block: usize,
    #[serde(default)]
    pub padding: Padding,
    /// Batch normalisation between each convolution and its ReLU.
    #[serde(default)]
    pub batch_norm: bool,
    /// Dropout probability before the dense head.
    #[serde(default)]
    pub dropout: f64,
    /// Hidden dense layers (ReLU) between the last block and the output, e.g. `[128]`.
    #[serde(default)]
    pub dense: Vec<usize>,
    /// Dropout probability after each hidden dense layer (Keras' `mnist_cnn` uses 0.5).
    #[serde(default)]
    pub dense_dropout: f64,
}

fn default_kernel() -> usize {
    3
}

fn default_per_block() -> usize {
    1
}

/// One block's convolution and its optional batch normalisation (the ReLU and pool that
/// follow are shared by every block), and the further convolutions of a VGG-style stack.
#[derive(Module, Debug)]
pub struct ConvBlock {
    pub conv: Conv2d,
    pub norm: Option<BatchNorm>,
    /// Convolutions 2… of the block (`per_block` > 1), each after the previous one's
    /// (batch norm and) ReLU.
    pub more: Vec<ConvLayer>,
}

/// A convolution and its optional batch normalisation.
#[derive(Module, Debug)]
pub struct ConvLayer {
    pub conv: Conv2d,
    pub norm: Option<BatchNorm>,
}

impl ConvBlock {
    /// `[batch, c_in, h, w]` → `[batch, c_out, h', w']`, before the activation.
    /// `constant_input`: x needs no gradient (the images), so the im2col product is used.
    #[cfg(test)]
    fn forward(&self, x: Tensor<4>, constant_input: bool) -> Tensor<4> {
        let x = self.convolve(x, constant_input);
        match &self.norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }
}

impl ConvBlock {
    /// The convolution alone: `[batch, c_in, h, w]` → `[batch, c_out, h', w']`.
    fn convolve(&self, x: Tensor<4>, constant_input: bool) -> Tensor<4> {
        if constant_input {
            flex_ops::conv2d_constant_input(&self.conv, x)
        } else {
            flex_ops::conv2d(&self.conv, x)
        }
    }
}

#[derive(Module, Debug)]
pub struct Cnn {
    pub blocks: Vec<ConvBlock>,
    pub pool: MaxPool2d,
    pub dropout: Dropout,
    pub dense: Vec<Linear>,
    pub dense_dropout: Dropout,
    pub output: Linear,
}

/// Side length after one block: `convs` convolutions (same or valid), then 2×2 max-pool.
fn block_out(side: usize, kernel: usize, padding: Padding, convs: usize) -> Option<usize> {
    let conv = match padding {
        Padding::Same => side,
        Padding::Valid => side.checked_sub((kernel - 1) * convs)?,
    };
    (conv >= 2).then_some(conv / 2)
}

impl Cnn {
    fn flat_size(p: &CnnParams, height: usize, width: usize) -> Option<usize> {
        let (mut h, mut w) = (height, width);
        for _ in &p.conv {
            h = block_out(h, p.kernel, p.padding, p.per_block)?;
            w = block_out(w, p.kernel, p.padding, p.per_block)?;
        }
        Some(h * w * p.conv.last().copied().unwrap_or(1))
    }
}

impl Cnn {
    /// Everything before the output layer: `[batch, 1, h, w]` → `[batch, last dense width]`.
    fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = images;
        for (i, block) in self.blocks.iter().enumerate() {
            let mut y = block.convolve(x, i == 0);
            let mut norm = block.norm.as_ref();
            for layer in &block.more {
                // A VGG stack: relu(norm(·)) of the previous convolution, then the next one.
                y = relu(match norm {
                    Some(n) => n.forward(y),
                    None => y,
                });
                y = flex_ops::conv2d(&layer.conv, y);
                norm = layer.norm.as_ref();
            }
            // relu(pool(norm(·))): one operation on flex, see `flex_ops`.
            x = block_tail(norm, &self.pool, y);
        }
        let [b, c, h, w] = x.dims();
        let mut x = dropout(&self.dropout, x.reshape([b, c * h * w])); // flatten: [batch, c·h·w]
        for layer in &self.dense {
            x = dropout(&self.dense_dropout, relu(linear(layer, x)));
        }
        x
    }
}

impl ImageNet for Cnn {
    type Params = CnnParams;

    fn build_for(
        p: &CnnParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
        device: &Device,
    ) -> Result<Self, String> {
        if p.conv.is_empty() || p.conv.contains(&0) {
            return Err("conv: need at least one block, each with at least one filter".into());
        }
        if p.kernel == 0 || p.kernel.is_multiple_of(2) {
            return Err(format!("kernel: must be odd (3, 5, …), got {}", p.kernel));
        }
        if p.per_block == 0 {
            return Err("per_block: at least one convolution per block".into());
        }
        check_dropout(&[("dropout", p.dropout), ("dense_dropout", p.dense_dropout)])?;
        let flat = Cnn::flat_size(p, height, width).ok_or_else(|| {
            format!("conv: {} blocks of {}×{} convolution and 2×2 pooling do not fit a {height}×{width} image", p.conv.len(), p.kernel, p.kernel)
        })?;
        let padding = match p.padding {
            Padding::Same => PaddingConfig2d::Same,
            Padding::Valid => PaddingConfig2d::Valid,
        };
        let mut channels = channels;
        let mut blocks = Vec::new();
        let layer = |c_in: usize, filters: usize| ConvLayer {
            // out: [batch, filters, h', w'] (h' = h for same padding, h − k + 1 for valid)
            conv: Conv2dConfig::new([c_in, filters], [p.kernel, p.kernel])
                .with_padding(padding.clone())
                .init(device),
            norm: p
                .batch_norm
                .then(|| BatchNormConfig::new(filters).init(device)),
        };
        for &filters in &p.conv {
            let ConvLayer { conv, norm } = layer(channels, filters);
            let more = (1..p.per_block).map(|_| layer(filters, filters)).collect();
            blocks.push(ConvBlock { conv, norm, more });
            channels = filters;
        }
        let mut dense = Vec::new();
        let mut width_in = flat;
        for &units in &p.dense {
            dense.push(LinearConfig::new(width_in, units).init(device));
            width_in = units;
        }
        Ok(Cnn {
            blocks,
            pool: MaxPool2dConfig::new([2, 2]).init(), // out: [batch, c, h/2, w/2]
            dropout: DropoutConfig::new(p.dropout).init(),
            dense,
            dense_dropout: DropoutConfig::new(p.dense_dropout).init(),
            output: LinearConfig::new(width_in, outputs).init(device), // out: [batch, outputs]
        })
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        linear(&self.output, self.features(images))
    }

    fn forward_features(&self, images: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let features = self.features(images);
        (linear(&self.output, features.clone()), features)
    }

    /// `scripts/reference/pytorch_cnn.py`'s `nn.Sequential`, built by the same rule: per block
    /// Conv2d, \[BatchNorm2d\], ReLU, MaxPool2d; [Dropout]; Flatten; per dense layer Linear,
    /// ReLU, [Dropout]; the output Linear. (kiln pools before the ReLU; the two commute.)
    fn torch_names(p: &CnnParams) -> Option<kiln_core::export::TorchNames> {
        use kiln_core::export::{TorchName, TorchNames};
        let mut t = TorchNames::default();
        let mut put = |burn: String, torch: String, transpose: bool| {
            t.names.insert(
                burn,
                TorchName {
                    name: torch,
                    transpose,
                },
            );
        };
        let mut idx = 0;
        let mut counters = Vec::new();
        for b in 0..p.conv.len() {
            for j in 0..p.per_block {
                // The block's first convolution, then `more.{j − 1}`.
                let at = if j == 0 {
                    format!("blocks.{b}")
                } else {
                    format!("blocks.{b}.more.{}", j - 1)
                };
                put(format!("{at}.conv.weight"), format!("{idx}.weight"), false);
                put(format!("{at}.conv.bias"), format!("{idx}.bias"), false);
                idx += 1;
                if p.batch_norm {
                    for (burn, torch) in [
                        ("gamma", "weight"),
                        ("beta", "bias"),
                        ("running_mean", "running_mean"),
                        ("running_var", "running_var"),
                    ] {
                        put(format!("{at}.norm.{burn}"), format!("{idx}.{torch}"), false);
                    }
                    counters.push(format!("{idx}.num_batches_tracked"));
                    idx += 1;
                }
                idx += 1; // ReLU
            }
            idx += 1; // MaxPool2d
        }
        idx += usize::from(p.dropout > 0.0) + 1; // [Dropout], Flatten
        for d in 0..p.dense.len() {
            put(format!("dense.{d}.weight"), format!("{idx}.weight"), true);
            put(format!("dense.{d}.bias"), format!("{idx}.bias"), false);
            idx += 2 + usize::from(p.dense_dropout > 0.0); // Linear, ReLU, [Dropout]
        }
        put("output.weight".into(), format!("{idx}.weight"), true);
        put("output.bias".into(), format!("{idx}.bias"), false);
        t.counters = counters;
        Some(t)
    }

    /// Per block Conv, \[BatchNormalization\], MaxPool, Relu (kiln's order; pooling and ReLU
    /// commute); Flatten; per dense layer Gemm, Relu; the output Gemm. Dropout is the identity
    /// at inference.
    fn onnx(&self, g: &mut kiln_core::onnx::Graph, x: &str) -> Result<String, String> {
        let mut x = x.to_string();
        for (i, block) in self.blocks.iter().enumerate() {
            x = g
                .conv(&format!("blocks.{i}.conv"), &block.conv, &x)
                .map_err(|e| e.to_string())?;
            if let Some(norm) = &block.norm {
                x = g.batch_norm(&format!("blocks.{i}.norm"), norm, &x);
            }
            for (j, layer) in block.more.iter().enumerate() {
                x = g.node("Relu", &[&x], &[]);
                x = g
                    .conv(&format!("blocks.{i}.more.{j}.conv"), &layer.conv, &x)
                    .map_err(|e| e.to_string())?;
                if let Some(norm) = &layer.norm {
                    x = g.batch_norm(&format!("blocks.{i}.more.{j}.norm"), norm, &x);
                }
            }
            x = g.max_pool(&self.pool, &x).map_err(|e| e.to_string())?;
            x = g.node("Relu", &[&x], &[]);
        }
        x = g.node("Flatten", &[&x], &[kiln_core::onnx::Attr::Int("axis", 1)]);
        for (i, layer) in self.dense.iter().enumerate() {
            x = g.linear(&format!("dense.{i}"), layer, &x);
            x = g.node("Relu", &[&x], &[]);
        }
        Ok(g.linear("output", &self.output, &x))
    }

    fn describe(
        p: &CnnParams,
        channels: usize,
        height: usize,
        width: usize,
        outputs: usize,
    ) -> String {
        let blocks: Vec<String> = p
            .conv
            .iter()
            .map(|f| {
                let bn = if p.batch_norm { "-bn" } else { "" };
                let times = if p.per_block > 1 {
                    format!("×{}", p.per_block)
                } else {
                    String::new()
                };
                format!("conv{f}k{}{bn}{times}-pool", p.kernel)
            })
            .collect();
        let mut parts = vec![
            kiln_vision::input_size(channels, height, width),
            blocks.join("-"),
        ];
        if p.dropout > 0.0 {
            parts.push(format!("dropout{}", p.dropout));
        }
        for d in &p.dense {
            parts.push(format!("fc{d}"));
            if p.dense_dropout > 0.0 {
                parts.push(format!("dropout{}", p.dense_dropout));
            }
        }
        parts.push(format!("fc{outputs}"));
        format!("CNN {} ({:?} padding)", parts.join("-"), p.padding)
    }
}

/// The CNN family for the runner's registry.
pub static FAMILY: ImageFamily<Cnn> = ImageFamily::new(
    "cnn",
    "convolutional network: conv/pool blocks, dropout, dense head; MNIST, Fashion-MNIST or 8×8 digits",
    "mnist",
);

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use kiln_core::data::to_vec;

    /// Course deck 3's score board: 2×2 max-pooling of the 6×6 board gives
    /// 36 44 43 / 37 26 35 / 38 34 40.
    #[test]
    fn max_pool_matches_the_worked_example() {
        let d = Device::flex();
        #[rustfmt::skip]
        let board = vec![
            35., 27., 44., 32., 36., 38.,
            36., 36., 37., 36., 36., 43.,
            37., 37., 23., 26., 17., 35.,
            29., 25., 22., 18., 14., 27.,
            27., 25., 24., 21., 24., 32.,
            31., 38., 27., 34., 25., 40.,
        ];
        let x = Tensor::<4>::from_data(TensorData::new(board, [1, 1, 6, 6]), &d);
        let pooled = MaxPool2dConfig::new([2, 2]).init().forward(x);
        assert_eq!(pooled.dims(), [1, 1, 3, 3]);
        assert_eq!(
            to_vec(pooled),
            vec![36., 44., 43., 37., 26., 35., 38., 34., 40.]
        );
    }

    /// The im2col product computes Burn's convolution: same values and the same weight
    /// gradient, for same, valid and explicit padding, one and several input channels.
    #[test]
    fn im2col_convolution_matches_burn() {
        use burn::tensor::Distribution;
        let d = Device::flex().autodiff();
        d.seed(9);
        for (channels, padding) in [
            (1, PaddingConfig2d::Same),
            (1, PaddingConfig2d::Valid),
            (3, PaddingConfig2d::Same),
            (2, PaddingConfig2d::Explicit(2, 0, 1, 1)),
        ] {
            let conv = Conv2dConfig::new([channels, 4], [3, 3])
                .with_padding(padding.clone())
                .init(&d);
            let x = Tensor::<4>::random([2, channels, 7, 6], Distribution::Normal(0.0, 1.0), &d);
            let ours = conv2d_im2col(&conv, x.clone());
            let burns = conv.forward(x);
            assert_eq!(ours.dims(), burns.dims(), "{padding:?}");
            let (a, b) = (to_vec(ours.clone()), to_vec(burns.clone()));
            assert!(
                a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4),
                "{padding:?}"
            );
            // The same loss through each gives the same ∂L/∂W.
            let g1 = ours.powf_scalar(2.0).sum().backward();
            let g2 = burns.powf_scalar(2.0).sum().backward();
            let w1 = to_vec(conv.weight.grad(&g1).unwrap());
            let w2 = to_vec(conv.weight.grad(&g2).unwrap());
            assert!(
                w1.iter()
                    .zip(&w2)
                    .all(|(p, q)| (p - q).abs() < 1e-3 * (1.0 + q.abs())),
                "{padding:?}: {w1:?} vs {w2:?}"
            );
        }
    }

    fn params(padding: Padding) -> CnnParams {
        CnnParams {
            conv: vec![32, 64],
            kernel: 3,
            per_block: 1,
            padding,
            batch_norm: false,
            dropout: 0.25,
            dense: vec![],
            dense_dropout: 0.0,
        }
    }

    #[test]
    fn same_and_valid_output_shapes() {
        let d = Device::flex();
        let x = Tensor::<4>::zeros([2, 1, 28, 28], &d);
        let same = Cnn::build(&params(Padding::Same), 28, 28, 10, &d).unwrap();
        let valid = Cnn::build(&params(Padding::Valid), 28, 28, 10, &d).unwrap();
        assert_eq!(
            same.blocks[0].forward(x.clone(), true).dims(),
            [2, 32, 28, 28]
        );
        assert_eq!(
            valid.blocks[0].forward(x.clone(), false).dims(),
            [2, 32, 26, 26]
        );
        assert_eq!(ImageNet::forward(&same, x.clone()).dims(), [2, 10]);
        assert_eq!(ImageNet::forward(&valid, x).dims(), [2, 10]);
        // same: 28 → 14 → 7, so 7·7·64 inputs to the head; valid: 28 → 26 → 13 → 11 → 5.
        assert_eq!(same.output.weight.val().dims(), [7 * 7 * 64, 10]);
        assert_eq!(valid.output.weight.val().dims(), [5 * 5 * 64, 10]);
    }

    /// While training, batch norm makes every channel of a block's output mean 0, variance 1
    /// over the batch and positions (γ = 1, β = 0 at initialisation); evaluation uses the
    /// running averages instead, which after one step are 0.9·(0, 1) + 0.1·(μ_B, σ²_B).
    #[test]
    fn batch_norm_normalises_each_channel_while_training() {
        use burn::tensor::Distribution;
        let d = Device::flex().autodiff();
        d.seed(3);
        let p = CnnParams {
            batch_norm: true,
            ..params(Padding::Same)
        };
        let net = Cnn::build(&p, 6, 6, 10, &d).unwrap();
        let x = Tensor::<4>::random([4, 1, 6, 6], Distribution::Uniform(0.0, 5.0), &d);
        let y = net.blocks[0].forward(x.clone(), true); // [4, 32, 6, 6]
        let per_channel = y.swap_dims(0, 1).reshape([32, 4 * 36]);
        let means = to_vec(per_channel.clone().mean_dim(1));
        let vars = to_vec(per_channel.var_bias(1));
        assert!(means.iter().all(|m| m.abs() < 1e-4), "{means:?}");
        assert!(vars.iter().all(|v| (v - 1.0).abs() < 1e-3), "{vars:?}");

        // Evaluation: no longer normalised by the batch, so the same input gives other values.
        let eval = net.valid();
        let inner = d.clone().inner();
        let z = eval.blocks[0].forward(x.inner(), true);
        assert_eq!(z.device(), inner);
        let z_vars = to_vec(z.swap_dims(0, 1).reshape([32, 4 * 36]).var_bias(1));
        assert!(z_vars.iter().any(|v| (v - 1.0).abs() > 0.01), "{z_vars:?}");
    }

    /// A VGG-style stack (`per_block = 2`): two convolutions (with their batch norms) before
    /// each pool, the second filters → filters; valid padding shrinks by k − 1 per convolution;
    /// every tensor has a PyTorch name, in the twin's `nn.Sequential` order.
    #[test]
    fn vgg_style_blocks() {
        let d = Device::flex();
        let p = CnnParams {
            per_block: 2,
            batch_norm: true,
            ..params(Padding::Same)
        };
        let net = Cnn::build(&p, 28, 28, 10, &d).unwrap();
        assert_eq!(net.blocks[0].more.len(), 1);
        assert_eq!(net.blocks[1].more[0].conv.weight.dims(), [64, 64, 3, 3]);
        let x = Tensor::<4>::zeros([2, 1, 28, 28], &d);
        assert_eq!(ImageNet::forward(&net, x).dims(), [2, 10]);
        assert_eq!(net.output.weight.val().dims(), [7 * 7 * 64, 10]);
        // valid: 28 → 24 → 12 → 8 → 4.
        let valid = Cnn::build(
            &CnnParams {
                per_block: 2,
                ..params(Padding::Valid)
            },
            28,
            28,
            10,
            &d,
        )
        .unwrap();
        assert_eq!(valid.output.weight.val().dims(), [4 * 4 * 64, 10]);
        let names = Cnn::torch_names(&p).unwrap();
        let burn = kiln_core::import::tensor_names(&net);
        assert_eq!(names.names.len(), burn.len());
        assert!(burn.iter().all(|b| names.names.contains_key(b)), "{burn:?}");
        // Conv, BN, ReLU, Conv, BN, ReLU, MaxPool: the second block starts at 7.
        assert_eq!(names.names["blocks.0.more.0.conv.weight"].name, "3.weight");
        assert_eq!(names.names["blocks.1.conv.weight"].name, "7.weight");
        assert!(Cnn::build(&CnnParams { per_block: 0, ..p }, 28, 28, 10, &d).is_err());
    }

    #[test]
    fn rejects_networks_that_do_not_fit() {
        let d = Device::flex();
        let too_deep = CnnParams {
            conv: vec![8, 8, 8, 8],
            ..params(Padding::Valid)
        };
        assert!(
            Cnn::build(&too_deep, 8, 8, 10, &d)
                .unwrap_err()
                .contains("do not fit")
        );
        let even = CnnParams {
            kernel: 4,
            ..params(Padding::Same)
        };
        assert!(Cnn::build(&even, 28, 28, 10, &d).is_err());
    }
}

/// The default config's network without dropout (whose masks are drawn per backend), smaller
/// for the CPU test.
#[cfg(test)]
fn parity_params(conv: Vec<usize>, dense: Vec<usize>) -> CnnParams {
    CnnParams {
        conv,
        kernel: 3,
        per_block: 1,
        padding: Padding::Same,
        batch_norm: true,
        dropout: 0.0,
        dense,
        dense_dropout: 0.0,
    }
}

/// The CNN's training step on flex (kiln's `flex_ops` kernels) against ndarray (Burn's own
/// convolution, batch norm and pooling), from the same weights on the same batch.
#[test]
fn one_step_on_flex_kernels_matches_burns_ops() {
    let params = parity_params(vec![8, 16], vec![32]);
    #[allow(deprecated)]
    let (a, b) = kiln_vision::parity_steps::<Cnn>(&params, 16, 0.05, &[Device::ndarray()]);
    kiln_core::train::steps_agree(&a, &b, 1e-4).unwrap();
}

/// The CNN's training step on wgpu (Burn's CubeCL kernels) against flex (kiln's `flex_ops`
/// kernels), from the same weights on the same batch. Compiled with `--features wgpu`.
#[cfg(all(test, feature = "wgpu"))]
#[test]
fn one_step_on_wgpu_matches_flex() {
    let params = parity_params(vec![32, 64], vec![128]);
    let wgpu = kiln_core::BackendName::Wgpu.device().unwrap();
    let (a, b) = kiln_vision::parity_steps::<Cnn>(&params, 16, 0.05, &[wgpu]);
    kiln_core::train::steps_agree(&a, &b, 1e-4).unwrap();
}

/// Data parallel with batch norm (see `kiln_core::train`): each replica normalises with its
/// own share's statistics, so the step's loss is the mean of the two shares' losses, each
/// as on one device; the running averages are the first replica's — the tensors of the
/// two-device step that equal a one-device step on the first share alone, and not one on the
/// second share, are the running means and variances (two per convolution block).
#[cfg(test)]
fn data_parallel_with_batch_norm(devices: [Device; 2], rel: f32) {
    let params = parity_params(vec![8, 16], vec![32]);
    let all: Vec<usize> = (0..16).collect();
    let mut steps = kiln_vision::parity_runs::<Cnn>(
        &params,
        16,
        0.05,
        &[
            (&all, &devices),
            (&all[..8], &devices[..1]),
            (&all[8..], &devices[1..]),
        ],
    );
    let (second, first, two) = (steps.remove(2), steps.remove(1), steps.remove(0));
    let mean = (first.loss + second.loss) / 2.0;
    assert!(
        (two.loss - mean).abs() <= rel * mean,
        "{} vs {mean}",
        two.loss
    );
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5);
    // (A convolution's bias before batch norm gets no gradient and is equal in all three.)
    let running = two
        .parameters
        .iter()
        .zip(&first.parameters)
        .zip(&second.parameters)
        .filter(|((t, f), s)| same(t, f) && !same(t, s))
        .count();
    assert_eq!(running, 4, "tensors equal to the first share's step only");
}

#[test]
fn data_parallel_with_batch_norm_on_flex() {
    data_parallel_with_batch_norm([Device::flex(), Device::flex()], 1e-5);
}

/// The same across two distinct wgpu devices (on lavapipe: two devices of one adapter).
#[cfg(all(test, feature = "wgpu"))]
#[test]
fn data_parallel_with_batch_norm_on_two_wgpu_devices() {
    let first = kiln_core::BackendName::Wgpu.device().unwrap();
    let second = Device::wgpu(burn::tensor::DeviceKind::Cpu);
    assert_ne!(first, second);
    data_parallel_with_batch_norm([first, second], 1e-4);
}
