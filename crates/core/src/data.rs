//! In-memory tabular examples and their conversion to tensors, one mini-batch at a time.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Dense examples: `x` is row-major `len × dim` (f32), `y` one target per example
/// (a real value for regression, a class index for classification).
#[derive(Debug, Clone, Default)]
pub struct DenseSet {
    pub x: Vec<f32>,
    pub dim: usize,
    pub y: Vec<f32>,
}

impl DenseSet {
    pub fn new(rows: &[Vec<f64>], y: &[f64]) -> DenseSet {
        let dim = rows.first().map_or(0, Vec::len);
        DenseSet {
            x: rows.iter().flatten().map(|&v| v as f32).collect(),
            dim,
            y: y.iter().map(|&v| v as f32).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The chosen examples as a `[batch, dim]` tensor.
    pub fn batch_x(&self, indices: &[usize], device: &Device) -> Tensor<2> {
        let mut buf = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            buf.extend_from_slice(&self.x[i * self.dim..(i + 1) * self.dim]);
        }
        Tensor::from_data(TensorData::new(buf, [indices.len(), self.dim]), device)
    }

    /// Every example as one `[len, dim]` tensor (evaluation and prediction).
    pub fn all_x(&self, device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(self.x.clone(), [self.len(), self.dim]),
            device,
        )
    }

    /// Real targets as `[batch, 1]`.
    pub fn batch_y(&self, indices: &[usize], device: &Device) -> Tensor<2> {
        let buf: Vec<f32> = indices.iter().map(|&i| self.y[i]).collect();
        Tensor::from_data(TensorData::new(buf, [indices.len(), 1]), device)
    }

    /// Class targets as `[batch]` integers.
    pub fn batch_classes(&self, indices: &[usize], device: &Device) -> Tensor<1, Int> {
        let buf: Vec<i64> = indices.iter().map(|&i| self.y[i] as i64).collect();
        Tensor::from_data(TensorData::new(buf, [indices.len()]), device)
    }

    /// A subset by indices.
    pub fn select(&self, indices: &[usize]) -> DenseSet {
        let mut out = DenseSet {
            x: Vec::with_capacity(indices.len() * self.dim),
            dim: self.dim,
            y: Vec::with_capacity(indices.len()),
        };
        for &i in indices {
            out.x
                .extend_from_slice(&self.x[i * self.dim..(i + 1) * self.dim]);
            out.y.push(self.y[i]);
        }
        out
    }
}

/// A tensor's values as `Vec<f32>` (for reports and tests).
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}
