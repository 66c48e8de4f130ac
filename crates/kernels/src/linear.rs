//! A dense (fully connected) layer as one flex operation, forward and backward.
//!
//! For a batch of rows X `[m, k]` (every leading dimension of the input folded into m), Burn's
//! weight W `[k, n]` and bias b `[n]`:
//!
//! ```text
//! Y = X·W + b                      (each row: y_j = Σ_i x_i·W_ij + b_j)
//! ∂L/∂X = G·Wᵀ,   ∂L/∂W = Xᵀ·G,   ∂L/∂b_j = Σ_rows G_j      (G = ∂L/∂Y)
//! ```
//!
//! Burn's `Linear` computes exactly these, but every product's output on flex is allocated
//! zeroed and then copied once more to realign it, and the bias is added into a third tensor:
//! in the character Transformer's profile those copies and the fresh pages behind them took
//! 8% of a training step. Here each product writes into one buffer that becomes the tensor,
//! and the bias is added in place (for a batch of 1,024 rows or more, the product runs in
//! blocks of 256 rows, one thread each, and each block gets its bias while still in the
//! cache). The products are flex's own calls of the `gemm` crate with
//! the same operands, on as many threads, and the bias sum is flex's own reduction, so the
//! results are Burn's to the bit wherever Burn folds the rows into one product and the batch
//! has fewer than 1,024 rows: every 2-d input of such a batch (every network's dense layers
//! but the Transformer's), and the 3-d inputs Burn's `MatmulTransformPolicy` merges. The weight
//! gradient of a batch of 1,024 rows or more, Xᵀ·G, is kiln's blocked product
//! (`ops::flex_product`), faster there and equal to rounding. For a `[batch, T, d]`
//! input whose T fills Burn's row tiles (the Transformer's, T = 128) Burn keeps a batched
//! product and sums ∂L/∂W over the sequences afterwards; here it is one product over all rows.
//! Both differ from Burn's weight gradient in the last bits (unit test: each case). Other
//! backends, and a layer without bias, take Burn's `Linear::forward`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::Linear;
use burn::tensor::{Shape, Tensor};

use crate::ops::{
    contiguous, f32s, flex_product, flex_product_then, on_flex_f32, rows, tensor, transposed,
};

#[backend_extension(Flex, Autodiff)]
pub trait LinearOps: Backend {
    /// `[m, k]` X, `[k, n]` W, `[n]` b → `[m, n]` X·W + b.
    fn linear_rows(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `layer.forward(x)`: on flex (f32), for a layer with bias, one fused operation each way;
/// elsewhere Burn's own. `x` is `[…, k]`, the result `[…, n]`.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    // The weight before the bias, as `Linear::forward`: parameters are initialised lazily, on
    // first use, so this order keeps every seed's starting weights.
    let weight = layer.weight.val();
    match layer.bias.as_ref().map(|b| b.val()) {
        Some(bias) if on_flex_f32(&x) && on_flex_f32(&weight) => affine(x, weight, bias),
        _ => layer.forward(x),
    }
}

/// x·W + b for a weight `[k, n]` and bias `[n]` given as tensors (for instance several
/// layers' weights joined column-wise, to compute their outputs side by side in one product):
/// on flex (f32) the fused operation of [`linear`], elsewhere Burn's `linear`. `x` is
/// `[…, k]`, the result `[…, n]`.
pub fn affine<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<D> {
    if !(on_flex_f32(&x) && on_flex_f32(&weight)) {
        return burn::tensor::module::linear(x, weight, Some(bias));
    }
    let mut shape = x.shape();
    let [k, n] = weight.dims();
    let m = shape.num_elements() / k.max(1);
    let x: Tensor<2> = x.reshape([m, k]);
    let y: Tensor<2> = Tensor::from_dispatch(<Dispatch as LinearOps>::linear_rows(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ));
    shape[D - 1] = n;
    y.reshape(shape)
}

/// The dims (m, k, n) of X `[m, k]` · W `[k, n]`.
fn dims(x: &FlexTensor, weight: &FlexTensor) -> (usize, usize, usize) {
    let (xs, ws) = (x.layout().shape(), weight.layout().shape());
    (xs[0], xs[1], ws[1])
}

/// Y = X·W + b: the product, then b added to every row in place (Burn's order of operations).
/// Also returns X and W contiguous, as the backward pass keeps them.
fn forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
) -> ([FlexTensor; 2], FlexTensor) {
    let (m, k, n) = dims(x, weight);
    let [x, weight, bias] = [x, weight, bias].map(contiguous);
    let bias_values = f32s(&bias);
    let add_bias = |y: &mut [f32]| {
        for row in y.chunks_exact_mut(n.max(1)) {
            row.iter_mut().zip(bias_values).for_each(|(v, b)| *v += b);
        }
    };
    let y = flex_product_then(m, n, k, rows(f32s(&x), k), rows(f32s(&weight), n), add_bias);
    ([x, weight], tensor(y, vec![m, n]))
}

impl LinearOps for Flex {
    fn linear_rows(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        forward(&x, &weight, &bias).1
    }
}

impl<C: CheckpointStrategy> LinearOps for Autodiff<Flex, C> {
    fn linear_rows(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearBackward;

        impl Backward<Flex, 3> for LinearBackward {
            // X and W, contiguous
            type State = [FlexTensor; 2];

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight, node_bias] = ops.parents;
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let [x, weight] = &ops.state;
                let (m, k, n) = dims(x, weight);
                let (g, x, w) = (f32s(&grad), f32s(x), f32s(weight));
                if let Some(node) = node_x {
                    // ∂L/∂X = G·Wᵀ
                    let dx = flex_product(m, k, n, rows(g, n), transposed(w, n));
                    grads.register::<Flex>(node.id, tensor(dx, vec![m, k]));
                }
                if let Some(node) = node_weight {
                    // ∂L/∂W = Xᵀ·G
                    let dw = flex_product(k, n, m, transposed(x, k), rows(g, n));
                    grads.register::<Flex>(node.id, tensor(dw, vec![k, n]));
                }
                if let Some(node) = node_bias {
                    // ∂L/∂b = Σ_rows G, by flex's own reduction (Burn's summation order)
                    let db = Flex::float_sum_dim(grad.clone(), 0);
                    grads.register::<Flex>(node.id, Flex::float_reshape(db, Shape::new([n])));
                }
            }
        }

        let nodes = [x.node(), weight.node(), bias.node()];
        let [x, weight, bias] = [x, weight, bias].map(|t| t.into_primitive());
        match LinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (kept, y) = forward(&x, &weight, &bias);
                prep.finish(kept, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::linear_rows(x, weight, bias)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::to_vec;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution};

    /// `linear` against Burn's `Linear` on flex with autodiff: the output and the gradients of
    /// W, b and (when it needs one) X.
    /// `exact`: bit for bit; otherwise within 10⁻⁵ of each tensor's largest value.
    fn check<const D: usize>(shape: [usize; D], n: usize, x_grad: bool, exact: bool) {
        let dev = Device::flex().autodiff();
        dev.seed(4);
        let layer = LinearConfig::new(shape[D - 1], n).init(&dev);
        let x0 = Tensor::<D>::random(shape, Distribution::Normal(0.3, 2.0), &dev);
        let mut out_shape = shape;
        out_shape[D - 1] = n;
        let weight = Tensor::<D>::random(out_shape, Distribution::Normal(0.0, 1.0), &dev);
        let run = |fused: bool| {
            let x = if x_grad {
                x0.clone().detach().require_grad()
            } else {
                x0.clone().detach()
            };
            let y = if fused {
                linear(&layer, x.clone())
            } else {
                layer.forward(x.clone())
            };
            let grads = (y.clone() * weight.clone()).sum().backward();
            let mut g = vec![
                to_vec(layer.weight.val().grad(&grads).unwrap()),
                to_vec(layer.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
            ];
            if x_grad {
                g.push(to_vec(x.grad(&grads).unwrap()));
            } else {
                assert!(x.grad(&grads).is_none());
            }
            (to_vec(y), g)
        };
        let (y, g) = run(true);
        let (want, want_g) = run(false);
        for (what, (a, b)) in ["y", "∂W", "∂b", "∂X"]
            .iter()
            .zip([(&y, &want)].into_iter().chain(g.iter().zip(&want_g)))
        {
            assert_eq!(a.len(), b.len(), "{what}");
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (p, q) in a.iter().zip(b) {
                if exact {
                    assert_eq!(p.to_bits(), q.to_bits(), "{what} {shape:?}: {p} vs {q}");
                } else {
                    assert!(
                        (p - q).abs() <= 1e-5 * scale,
                        "{what} {shape:?}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// Sequences Burn folds into one product (bit for bit) and sequences of the Transformer's
    /// length, which it keeps batched (to 10⁻⁵); batches of vectors (the VAE's, the MLP's; the
    /// largest past flex's threading threshold), a single row, a first layer whose input needs
    /// no gradient (all bit for bit); a batch of 2,048 rows, whose weight gradient is kiln's
    /// blocked product (to 10⁻⁵); then inference without autodiff, and a fresh layer's first
    /// use.
    #[test]
    fn linear_kernel_is_burns_linear() {
        check([3, 40, 128], 96, true, true);
        check([1000, 128], 128, true, true);
        check([2048, 128], 128, true, false);
        check([4, 128, 64], 48, true, false);
        check([128, 400], 20, true, true);
        check([70, 37], 5, true, true);
        check([1, 16], 16, true, true);
        check([33, 20], 7, false, true);
        let dev = Device::flex();
        dev.seed(5);
        let layer = LinearConfig::new(24, 10).init(&dev);
        let x = Tensor::<2>::random([9, 24], Distribution::Normal(0.0, 1.0), &dev);
        assert_eq!(to_vec(linear(&layer, x.clone())), to_vec(layer.forward(x)));
        // Parameters are initialised on first use: a seed gives the same layer either way.
        let fresh = |fused: bool| {
            let dev = Device::flex();
            dev.seed(6);
            let layer = LinearConfig::new(3, 2).init(&dev);
            let x = Tensor::<2>::ones([1, 3], &dev);
            to_vec(if fused {
                linear(&layer, x)
            } else {
                layer.forward(x)
            })
        };
        assert_eq!(fresh(true), fresh(false));
    }
}
