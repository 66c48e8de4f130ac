//! Convolutional network (seed 003): blocks of convolution → ReLU → 2×2 max-pool, then
//! dropout and a dense head.
//!
//! A convolution slides k×k filters over the image: out[c](y, x) = b_c + Σ_{c', i, j}
//! W[c, c', i, j] · in[c'](y + i, x + j). "Same" padding keeps the size (pads k/2 zeros),
//! "valid" shrinks it by k − 1. Max-pooling keeps the largest value of every 2×2 window,
//! halving each side.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use kiln_vision::{ImageFamily, ImageNet};
use serde::{Deserialize, Serialize};

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
    #[serde(default)]
    pub padding: Padding,
    /// Dropout probability before the dense head.
    #[serde(default)]
    pub dropout: f64,
    /// Hidden dense layers (ReLU) between the last block and the output, e.g. `[128]`.
    #[serde(default)]
    pub dense: Vec<usize>,
}

fn default_kernel() -> usize {
    3
}

#[derive(Module, Debug)]
pub struct Cnn {
    pub convs: Vec<Conv2d>,
    pub pool: MaxPool2d,
    pub dropout: Dropout,
    pub dense: Vec<Linear>,
    pub output: Linear,
}

/// Side length after one block: convolution (same or valid), then 2×2 max-pool.
fn block_out(side: usize, kernel: usize, padding: Padding) -> Option<usize> {
    let conv = match padding {
        Padding::Same => side,
        Padding::Valid => side.checked_sub(kernel - 1)?,
    };
    (conv >= 2).then_some(conv / 2)
}

impl Cnn {
    fn flat_size(p: &CnnParams, height: usize, width: usize) -> Option<usize> {
        let (mut h, mut w) = (height, width);
        for _ in &p.conv {
            h = block_out(h, p.kernel, p.padding)?;
            w = block_out(w, p.kernel, p.padding)?;
        }
        Some(h * w * p.conv.last().copied().unwrap_or(1))
    }
}

impl ImageNet for Cnn {
    type Params = CnnParams;

    fn build(
        p: &CnnParams,
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
        if !(0.0..1.0).contains(&p.dropout) {
            return Err(format!("dropout: must be in [0, 1), got {}", p.dropout));
        }
        let flat = Cnn::flat_size(p, height, width).ok_or_else(|| {
            format!("conv: {} blocks of {}×{} convolution and 2×2 pooling do not fit a {height}×{width} image", p.conv.len(), p.kernel, p.kernel)
        })?;
        let padding = match p.padding {
            Padding::Same => PaddingConfig2d::Same,
            Padding::Valid => PaddingConfig2d::Valid,
        };
        let mut channels = 1;
        let mut convs = Vec::new();
        for &filters in &p.conv {
            // out: [batch, filters, h', w'] (h' = h for same padding, h − k + 1 for valid)
            convs.push(
                Conv2dConfig::new([channels, filters], [p.kernel, p.kernel])
                    .with_padding(padding.clone())
                    .init(device),
            );
            channels = filters;
        }
        let mut dense = Vec::new();
        let mut width_in = flat;
        for &units in &p.dense {
            dense.push(LinearConfig::new(width_in, units).init(device));
            width_in = units;
        }
        Ok(Cnn {
            convs,
            pool: MaxPool2dConfig::new([2, 2]).init(), // out: [batch, c, h/2, w/2]
            dropout: DropoutConfig::new(p.dropout).init(),
            dense,
            output: LinearConfig::new(width_in, outputs).init(device), // out: [batch, outputs]
        })
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = images;
        for conv in &self.convs {
            x = self.pool.forward(relu(conv.forward(x)));
        }
        let [b, c, h, w] = x.dims();
        let mut x = self.dropout.forward(x.reshape([b, c * h * w])); // flatten: [batch, c·h·w]
        for layer in &self.dense {
            x = relu(layer.forward(x));
        }
        self.output.forward(x)
    }

    fn describe(p: &CnnParams, height: usize, width: usize, outputs: usize) -> String {
        let blocks: Vec<String> = p
            .conv
            .iter()
            .map(|f| format!("conv{f}k{}-pool", p.kernel))
            .collect();
        let mut parts = vec![format!("{height}×{width}"), blocks.join("-")];
        if p.dropout > 0.0 {
            parts.push(format!("dropout{}", p.dropout));
        }
        parts.extend(p.dense.iter().map(|d| format!("fc{d}")));
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

    /// Seed 003's score board: 2×2 max-pooling of the 6×6 board gives
    /// 36 44 43 / 37 26 35 / 38 34 40.
    #[test]
    fn seed_003_max_pool() {
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

    fn params(padding: Padding) -> CnnParams {
        CnnParams {
            conv: vec![32, 64],
            kernel: 3,
            padding,
            dropout: 0.25,
            dense: vec![],
        }
    }

    #[test]
    fn same_and_valid_output_shapes() {
        let d = Device::flex();
        let x = Tensor::<4>::zeros([2, 1, 28, 28], &d);
        let same = Cnn::build(&params(Padding::Same), 28, 28, 10, &d).unwrap();
        let valid = Cnn::build(&params(Padding::Valid), 28, 28, 10, &d).unwrap();
        assert_eq!(same.convs[0].forward(x.clone()).dims(), [2, 32, 28, 28]);
        assert_eq!(valid.convs[0].forward(x.clone()).dims(), [2, 32, 26, 26]);
        assert_eq!(ImageNet::forward(&same, x.clone()).dims(), [2, 10]);
        assert_eq!(ImageNet::forward(&valid, x).dims(), [2, 10]);
        // same: 28 → 14 → 7, so 7·7·64 inputs to the head; valid: 28 → 26 → 13 → 11 → 5.
        assert_eq!(same.output.weight.val().dims(), [7 * 7 * 64, 10]);
        assert_eq!(valid.output.weight.val().dims(), [5 * 5 * 64, 10]);
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
