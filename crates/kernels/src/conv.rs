//! The CNN's three hot spots as flex operations with their own backward passes (a Burn
//! backend extension, `#[backend_extension(Flex, Autodiff)]`). Every other backend, and any
//! layer these do not cover, takes Burn's own operations; unit tests check that both give the
//! same values and gradients. Per batch of 128 on a 2-core machine, forward + backward
//! (`cargo run --release -p kiln-cnn --example layer_times`), the default network's step went
//! from about 95 ms to about 47 ms:
//!
//! 1. [`block_tail`]: batch norm → 2×2 max-pool → ReLU as one operation (39 → 8 ms for the
//!    first block, 18 → 4 ms for the second).
//! 2. [`conv2d`]: a stride-1 convolution whose weight gradient is one matrix product over
//!    im2col's columns (conv 32→64: 37 → 25 ms); its forward pass and ∂L/∂x are
//!    [`crate::strided`]'s products over cache-sized chunks of the batch (`kiln bench cnn`,
//!    three alternating pairs against flex's own convolution: 2.94–3.08k → 3.18–3.39k images/s
//!    for the forward pass).
//! 3. [`conv2d_constant_input`]: the first convolution, whose input (the images) needs no
//!    gradient, as short loops that keep the columns for the backward pass (12 → 5.5 ms).
//!
//! # The block tail
//!
//! Per channel c, over the M = N·H·W values of the batch (course deck 3's notation for the pool):
//!
//! - batch statistics: μ_c = (1/M) Σ x, σ²_c = (1/M) Σ (x − μ_c)²,  s_c = 1/√(σ²_c + ε)
//! - batch norm: x̂ = (x − μ_c)·s_c,  y = γ_c·x̂ + β_c
//! - pool and ReLU: z[i, j] = max(0, max_{p,q ∈ {0,1}} y[2i + p, 2j + q])
//!
//! (ReLU and the pool commute, ReLU being increasing, so this is the seed's
//! conv → BN → ReLU → pool.) Backward, given g = ∂L/∂z: the gradient reaches y only at the
//! window's largest value and only where z > 0, dy = g there and 0 elsewhere. Then (the
//! batch-norm backward, with μ and σ depending on x):
//!
//! ∂L/∂β_c = Σ dy,  ∂L/∂γ_c = Σ dy·x̂,  ∂L/∂x = γ_c·s_c·(dy − (∂L/∂β_c)/M − x̂·(∂L/∂γ_c)/M).
//!
//! Burn computes the same thing as five operations (the batch norm's reductions and
//! broadcasts, the pool with its indices, the ReLU), each a full pass over the block's
//! largest tensor in both directions. Here the forward reads x twice (statistics, then
//! normalise-pool-ReLU) and writes a quarter of it; the backward reads x twice and writes ∂L/∂x
//! once, and dy, which is three-quarters zeros, is never stored.
//!
//! # The convolutions
//!
//! out[n, f, p] = b_f + Σ_{c,i,j} W[f, c, i, j] · x_pad[n, c, p + (i, j)]. With
//! cols[(c, i, j), (n, p)] = x_pad[n, c, p + (i, j)] (im2col) and G = ∂L/∂out as [F, N·P]:
//! ∂L/∂W = G · colsᵀ and ∂L/∂b_f = Σ_{n,p} G[f, (n, p)]. Burn's default computes ∂L/∂W as a
//! convolution of the batch against the output gradient, which flex runs slowly.

use crate::ops::{
    contiguous, f32s, flex_threads, on_flex_f32, product, rows, tensor, transposed,
    unary_with_backward, written_in_full,
};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::ops::PadMode;
use rayon::prelude::*;
use std::mem::MaybeUninit;

#[backend_extension(Flex, Autodiff)]
pub trait CnnOps: Backend {
    /// `[N, C, H, W]` → `[2, C]`: each channel's mean μ_c and biased variance σ²_c.
    /// Not differentiated (the statistics feed the running averages and `norm_pool_relu`).
    fn channel_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// relu(maxpool₂ₓ₂(γ·(x − μ)/√(σ² + ε) + β)): `[N, C, H, W]` → `[N, C, H/2, W/2]`.
    /// With `batch_stats`, μ and σ² are x's own batch statistics and the backward pass
    /// differentiates through them (training); otherwise they are constants (running averages).
    fn norm_pool_relu(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
        batch_stats: bool,
    ) -> FloatTensor<Self>;

    /// relu(maxpool₂ₓ₂(x)): the tail of a block without batch norm.
    fn pool_relu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Burn's convolution with stride 1 and `padding` zeros on each side; its backward pass
    /// computes ∂L/∂W as one matrix product (see [`conv2d`]).
    fn conv2d_stride1(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> FloatTensor<Self>;

    /// The same convolution for an input that needs no gradient (the images) and few input
    /// values per position (C·k² ≤ 32): see [`conv2d_constant_input`].
    fn conv2d_constant_input(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// A convolution layer's forward pass, `[N, C, H, W]` → `[N, F, H', W']`. On flex, for
/// stride 1 (and no dilation or groups), the weight gradient is computed as one matrix product,
/// ∂L/∂W[f, (c, i, j)] = Σ_{n, p} ∂L/∂out[n, f, p] · x_pad[n, c, p + (i, j)], that is
/// ∂L/∂W = G · colsᵀ with G = ∂L/∂out as [F, N·H'·W'] and cols = im2col(x) as
/// [C·k², N·H'·W']; Burn's default computes it as a convolution of the batch against the
/// output gradient, three times slower here. The forward pass and ∂L/∂x are
/// [`crate::strided`]'s (W·cols(x) and col2im(Wᵀ·G) over cache-sized chunks of the batch).
/// A convolution without bias (ResNet's, followed by batch norm) runs as one with a constant
/// zero bias, which gets no gradient. Other strides go to [`crate::strided::conv2d`].
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match stride1_padding(conv) {
        Some(padding) if on_flex_f32(&x) => {
            let weight = conv.weight.val();
            let bias = match &conv.bias {
                Some(b) => b.val(),
                None => Tensor::<1>::zeros([weight.dims()[0]], &weight.device()),
            };
            Tensor::from_dispatch(<Dispatch as CnnOps>::conv2d_stride1(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                padding,
            ))
        }
        _ => crate::strided::conv2d(conv, x),
    }
}

/// The first convolution of a network, whose input x (the images) needs no gradient:
/// out[n, f, p] = b_f + Σ_k W[f, k] · cols_n[k, p] with cols_n = im2col(x_n) as [C·k², H'·W']
/// (k runs over (c, i, j)), and the backward pass needs only
/// ∂L/∂W[f, k] = Σ_{n, p} ∂L/∂out[n, f, p] · cols_n[k, p] and ∂L/∂b_f = Σ_{n, p} ∂L/∂out[n, f, p].
/// On flex, with C·k² ≤ 32, both are short loops over the batch that keep cols from the
/// forward pass; other backends take the im2col product of [`conv2d_im2col`], and
/// other convolutions [`conv2d`].
pub fn conv2d_constant_input(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [_, channels, kh, kw] = conv.weight.dims();
    match (stride1_padding(conv), &conv.bias) {
        (Some(padding), Some(bias))
            if channels * kh * kw <= 32 && !x.is_require_grad() && on_flex_f32(&x) =>
        {
            Tensor::from_dispatch(<Dispatch as CnnOps>::conv2d_constant_input(
                x.into_dispatch(),
                conv.weight.val().into_dispatch(),
                bias.val().into_dispatch(),
                padding,
            ))
        }
        _ if !on_flex_f32(&x) => conv2d_im2col(conv, x),
        _ => conv2d(conv, x),
    }
}

/// The zeros padded on each side, (top, bottom, left, right), of a convolution with stride 1,
/// no dilation and no groups; `None` for anything else (and for same padding with an even
/// kernel, which Burn pads asymmetrically).
pub(crate) fn stride1_pads(conv: &Conv2d) -> Option<(usize, usize, usize, usize)> {
    let [_, _, kh, kw] = conv.weight.dims();
    if conv.stride != [1, 1] || conv.dilation != [1, 1] || conv.groups != 1 {
        return None;
    }
    match conv.padding {
        PaddingConfig2d::Same if kh % 2 == 1 && kw % 2 == 1 => {
            Some((kh / 2, kh / 2, kw / 2, kw / 2))
        }
        PaddingConfig2d::Same => None,
        PaddingConfig2d::Valid => Some((0, 0, 0, 0)),
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some((top, bottom, left, right)),
    }
}

/// [rows, columns] of [`stride1_pads`] when each is the same on both sides (what kiln's
/// flex operations cover).
fn stride1_padding(conv: &Conv2d) -> Option<[usize; 2]> {
    match stride1_pads(conv)? {
        (top, bottom, left, right) if top == bottom && left == right => Some([top, left]),
        _ => None,
    }
}

/// Output side of a stride-1 convolution.
fn conv_out(side: usize, kernel: usize, padding: usize) -> usize {
    (side + 2 * padding + 1).saturating_sub(kernel)
}

/// im2col of every image, [N, C·k², H'·W'], and the output size [H', W'].
fn image_cols(x: &FlexTensor, weight: &FlexTensor, padding: [usize; 2]) -> (FlexTensor, Dims) {
    let (x, d) = planes(x);
    let s = weight.layout().shape();
    let (k, kh, kw) = (s[1] * s[2] * s[3], s[2], s[3]);
    let (oh, ow) = (conv_out(d.h, kh, padding[0]), conv_out(d.w, kw, padding[1]));
    let per_image = d.c * d.h * d.w;
    let images = |cols: &mut [MaybeUninit<f32>]| {
        cols.par_chunks_mut(k * oh * ow)
            .zip(f32s(&x).par_chunks(per_image))
            .for_each(|(out, image)| {
                let one = Dims { n: 1, ..d };
                kernels::im2col_rows_into(out, image, one, [kh, kw], padding, [oh, ow]);
            })
    };
    // SAFETY: `im2col_rows_into` writes every value of each image's share.
    let cols = unsafe { written_in_full(d.n * k * oh * ow, images) };
    let out = Dims {
        n: d.n,
        c: k,
        h: oh,
        w: ow,
    };
    (tensor(cols, vec![d.n, k, oh * ow]), out)
}

/// relu(pool(norm(x))) for the output x `[N, C, H, W]` of a block's convolution, with Burn's
/// batch-norm semantics: batch statistics (and a running-average update) while training on
/// an autodiff device, the running averages otherwise. `pool` must be a 2×2, stride-2 pool.
pub fn block_tail(norm: Option<&BatchNorm>, pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let plain_pool = pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && pool.dilation == [1, 1]
        && !pool.ceil_mode
        && matches!(pool.padding, burn::nn::PaddingConfig2d::Valid);
    let [_, _, h, w] = x.dims();
    if !(on_flex_f32(&x) && plain_pool && h >= 2 && w >= 2) {
        return block_tail_reference(norm, pool, x);
    }
    let Some(norm) = norm else {
        return Tensor::from_dispatch(<Dispatch as CnnOps>::pool_relu(x.into_dispatch()));
    };
    let (mean, var, training) = batch_statistics(norm, &x);
    Tensor::from_dispatch(<Dispatch as CnnOps>::norm_pool_relu(
        x.into_dispatch(),
        norm.gamma.val().into_dispatch(),
        norm.beta.val().into_dispatch(),
        mean.into_dispatch(),
        var.into_dispatch(),
        norm.epsilon,
        training,
    ))
}

/// The (μ, σ²) a batch norm uses on x `[N, C, H, W]` (flex), as Burn's `BatchNorm` does: while
/// training on an autodiff device, x's own batch statistics (`true`: the backward pass
/// differentiates through them), with the running averages updated as
/// r ← (1 − m)·r + m·batch; otherwise the running averages (`false`).
pub(crate) fn batch_statistics(norm: &BatchNorm, x: &Tensor<4>) -> (Tensor<1>, Tensor<1>, bool) {
    let device = x.device();
    let training = device.is_autodiff() && norm.training.is_enabled();
    if !training {
        return (
            norm.running_mean.value().to_device(&device),
            norm.running_var.value().to_device(&device),
            false,
        );
    }
    let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as CnnOps>::channel_stats(
        x.clone().detach().into_dispatch(),
    ));
    let channels = stats.dims()[1];
    let mean = stats.clone().slice([0..1, 0..channels]).reshape([channels]);
    let var = stats.slice([1..2, 0..channels]).reshape([channels]);
    let m = norm.momentum;
    let update = |running: Tensor<1>, batch: Tensor<1>| {
        running
            .to_device(&device)
            .mul_scalar(1.0 - m)
            .add(batch.mul_scalar(m))
            .detach()
    };
    norm.running_mean
        .update(update(norm.running_mean.value_sync(), mean.clone()));
    norm.running_var
        .update(update(norm.running_var.value_sync(), var.clone()));
    (mean, var, true)
}

/// The same as [`block_tail`] with Burn's own operations (what every backend but flex runs).
pub fn block_tail_reference(norm: Option<&BatchNorm>, pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let x = match norm {
        Some(norm) => norm.forward(x),
        None => x,
    };
    relu(pool.forward(x))
}

impl CnnOps for Flex {
    fn channel_stats(x: FlexTensor) -> FlexTensor {
        let (x, d) = planes(&x);
        let (mean, var) = kernels::channel_stats(f32s(&x), d);
        let mut stats = mean;
        stats.extend(var);
        tensor(stats, vec![2, d.c])
    }

    fn norm_pool_relu(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        var: FlexTensor,
        epsilon: f64,
        _batch_stats: bool,
    ) -> FlexTensor {
        let (x, d) = planes(&x);
        let affine = Affine::new(&gamma, &beta, &mean, &var, epsilon);
        let (scale, shift) = affine.scale_shift();
        let z = kernels::affine_pool_relu(f32s(&x), d, &scale, &shift);
        tensor(z, vec![d.n, d.c, d.h / 2, d.w / 2])
    }

    fn pool_relu(x: FlexTensor) -> FlexTensor {
        let (x, d) = planes(&x);
        let ones = vec![1.0; d.c];
        let zeros = vec![0.0; d.c];
        let z = kernels::affine_pool_relu(f32s(&x), d, &ones, &zeros);
        tensor(z, vec![d.n, d.c, d.h / 2, d.w / 2])
    }

    fn conv2d_stride1(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        padding: [usize; 2],
    ) -> FlexTensor {
        crate::strided::conv_forward(&x, &weight, &bias, [1, 1], padding)
    }

    fn conv2d_constant_input(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        padding: [usize; 2],
    ) -> FlexTensor {
        first_conv(&x, &weight, &bias, padding).0
    }
}

/// The first-layer convolution's output, with the columns (and their dims) that its
/// backward pass keeps.
fn first_conv(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
    padding: [usize; 2],
) -> (FlexTensor, FlexTensor, Dims) {
    let (cols, d) = image_cols(x, weight, padding);
    let out = kernels::first_conv_forward(
        f32s(&cols),
        d,
        f32s(&contiguous(weight)),
        f32s(&contiguous(bias)),
    );
    let filters = dims4(weight)[0];
    (tensor(out, vec![d.n, filters, d.h, d.w]), cols, d)
}

/// (∂L/∂W, ∂L/∂b) of a stride-1 convolution: ∂L/∂W = G·colsᵀ (see [`conv2d`]) and
/// ∂L/∂b_f = Σ_{n, p} G[f, (n, p)]. The batch goes through in chunks whose cols hold about
/// two million values (8 MB, reused by the allocator instead of fresh pages from the system).
fn conv2d_param_grads(
    x: &FlexTensor,
    grad: &FlexTensor,
    weight_shape: [usize; 4],
    padding: [usize; 2],
) -> (FlexTensor, FlexTensor) {
    let (x, d) = planes(x);
    let (g, gd) = planes(grad);
    let [filters, channels, kh, kw] = weight_shape;
    let (x, g) = (f32s(&x), f32s(&g));
    let per_image = channels * kh * kw * gd.h * gd.w;
    let chunk = (1_usize << 21).div_ceil(per_image).max(1);
    let ckk = channels * kh * kw;
    // ∂L/∂W, and one chunk's colsᵀ·G as [C·k², F] (flex's own product of Burn's operands,
    // written into one reused buffer instead of a fresh, realigned tensor per chunk).
    let mut weight_grad = vec![0.0f32; filters * ckk];
    let mut part = vec![0.0f32; ckk * filters];
    let mut bias_grad = vec![0.0f32; filters];
    for start in (0..d.n).step_by(chunk) {
        let n = chunk.min(d.n - start);
        let (dc, gc) = (Dims { n, ..d }, Dims { n, ..gd });
        let xs = &x[start * channels * d.h * d.w..][..n * channels * d.h * d.w];
        let gs = &g[start * filters * gd.h * gd.w..][..n * filters * gd.h * gd.w];
        let positions = n * gd.h * gd.w;
        let cols = kernels::im2col_rows(xs, dc, [kh, kw], padding, [gd.h, gd.w]);
        let g_rows = kernels::batch_to_rows(gs, gc);
        for (total, row) in bias_grad.iter_mut().zip(g_rows.chunks(positions)) {
            *total += kernels::sum(row);
        }
        let (a, b) = (rows(&cols, positions), transposed(&g_rows, positions));
        let threads = flex_threads(ckk, filters, positions);
        product(&mut part, ckk, filters, positions, a, b, false, threads);
        for (f, row) in weight_grad.chunks_exact_mut(ckk).enumerate() {
            for (j, w) in row.iter_mut().enumerate() {
                *w += part[j * filters + f];
            }
        }
    }
    (
        tensor(weight_grad, weight_shape.to_vec()),
        tensor(bias_grad, vec![filters]),
    )
}

/// The autodiff version: Burn's `Backward` with the gradients above.
/// ∂L/∂x of [`CnnOps::pool_relu`] from its input x and ∂L/∂out.
fn pool_relu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (x, d) = planes(x);
    let dx = kernels::pool_relu_backward(f32s(&x), f32s(&contiguous(grad)), d);
    tensor(dx, vec![d.n, d.c, d.h, d.w])
}

impl<C: CheckpointStrategy> CnnOps for Autodiff<Flex, C> {
    fn channel_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        AdTensor::<C>::new(Flex::channel_stats(x.into_primitive()))
    }

    fn norm_pool_relu(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
        batch_stats: bool,
    ) -> FloatTensor<Self> {
        norm_with_backward::<C>(
            [x, gamma, beta],
            [mean, var],
            (epsilon, batch_stats),
            Flex::norm_pool_relu,
            kernels::norm_pool_relu_backward,
        )
    }

    fn conv2d_stride1(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Conv2dBackward;

        impl Backward<Flex, 3> for Conv2dBackward {
            // x, W, padding
            type State = (FlexTensor, FlexTensor, [usize; 2]);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight, node_bias] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x, weight, padding) = ops.state;
                if node_weight.is_some() || node_bias.is_some() {
                    let (dw, db) = conv2d_param_grads(&x, &grad, dims4(&weight), padding);
                    if let Some(node) = node_weight {
                        grads.register::<Flex>(node.id, dw);
                    }
                    if let Some(node) = node_bias {
                        grads.register::<Flex>(node.id, db);
                    }
                }
                if let Some(node) = node_x {
                    let dx = crate::strided::conv_input_grad(&x, &weight, &grad, [1, 1], padding);
                    grads.register::<Flex>(node.id, dx);
                }
            }
        }

        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, weight, bias) = (
            x.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
        );
        match Conv2dBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = Flex::conv2d_stride1(x.clone(), weight.clone(), bias, padding);
                prep.finish((x, weight, padding), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::conv2d_stride1(x, weight, bias, padding)),
        }
    }

    fn conv2d_constant_input(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FirstConvBackward;

        impl Backward<Flex, 2> for FirstConvBackward {
            // cols [N, C·k², H'·W'] and the output's dims (c = C·k²), W's shape
            type State = (FlexTensor, Dims, [usize; 4]);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_weight, node_bias] = ops.parents;
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let (cols, d, shape) = ops.state;
                let (dw, db) = kernels::first_conv_backward(f32s(&cols), d, f32s(&grad), shape[0]);
                if let Some(node) = node_weight {
                    grads.register::<Flex>(node.id, tensor(dw, shape.to_vec()));
                }
                if let Some(node) = node_bias {
                    grads.register::<Flex>(node.id, tensor(db, vec![shape[0]]));
                }
            }
        }

        let nodes = [weight.node(), bias.node()];
        let (x, weight, bias) = (
            x.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
        );
        match FirstConvBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, cols, d) = first_conv(&x, &weight, &bias, padding);
                prep.finish((cols, d, dims4(&weight)), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::conv2d_constant_input(x, weight, bias, padding))
            }
        }
    }

    fn pool_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary_with_backward::<C, _>(x, Flex::pool_relu, pool_relu_backward)
    }
}

/// A flex operation of x, γ and β that normalises with μ, σ² and ε (`batch_stats`: x's own
/// batch statistics, differentiated through); its arguments in Burn's order.
pub(crate) type NormForward =
    fn(FlexTensor, FlexTensor, FlexTensor, FlexTensor, FlexTensor, f64, bool) -> FlexTensor;

/// Its backward kernel: (∂L/∂x, ∂L/∂γ, ∂L/∂β) from x, ∂L/∂out, x's dims, the statistics and
/// `batch_stats`.
pub(crate) type NormBackwardKernel =
    fn(&[f32], &[f32], Dims, &Affine, bool) -> (Vec<f32>, Vec<f32>, Vec<f32>);

/// The autodiff side of such an operation (the block tail's norm → pool → ReLU, batch norm
/// alone): out = `forward`, the gradients of x, γ and β from `backward` (∂L/∂x in x's shape).
pub(crate) fn norm_with_backward<C: CheckpointStrategy>(
    [x, gamma, beta]: [AdTensor<C>; 3],
    [mean, var]: [AdTensor<C>; 2],
    (epsilon, batch_stats): (f64, bool),
    forward: NormForward,
    backward: NormBackwardKernel,
) -> AdTensor<C> {
    struct NormBackward(NormBackwardKernel);

    impl std::fmt::Debug for NormBackward {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("NormBackward")
        }
    }

    impl Backward<Flex, 3> for NormBackward {
        // x, γ, β, μ, σ², ε, batch_stats
        type State = (
            FlexTensor,
            FlexTensor,
            FlexTensor,
            FlexTensor,
            FlexTensor,
            f64,
            bool,
        );

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_gamma, node_beta] = ops.parents;
            let grad = contiguous(&grads.consume::<Flex>(&ops.node));
            let (x, gamma, beta, mean, var, epsilon, batch_stats) = ops.state;
            let (x, d) = planes(&x);
            let affine = Affine::new(&gamma, &beta, &mean, &var, epsilon);
            let (dx, dgamma, dbeta) = (self.0)(f32s(&x), f32s(&grad), d, &affine, batch_stats);
            if let Some(node) = node_x {
                grads.register::<Flex>(node.id, tensor(dx, vec![d.n, d.c, d.h, d.w]));
            }
            if let Some(node) = node_gamma {
                grads.register::<Flex>(node.id, tensor(dgamma, vec![d.c]));
            }
            if let Some(node) = node_beta {
                grads.register::<Flex>(node.id, tensor(dbeta, vec![d.c]));
            }
        }
    }

    let nodes = [x.node(), gamma.node(), beta.node()];
    let (x, gamma, beta) = (
        x.into_primitive(),
        gamma.into_primitive(),
        beta.into_primitive(),
    );
    let (mean, var) = (mean.into_primitive(), var.into_primitive());
    match NormBackward(backward)
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = forward(
                x.clone(),
                gamma.clone(),
                beta.clone(),
                mean.clone(),
                var.clone(),
                epsilon,
                batch_stats,
            );
            prep.finish((x, gamma, beta, mean, var, epsilon, batch_stats), out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(x, gamma, beta, mean, var, epsilon, batch_stats))
        }
    }
}

/// The autodiff tensor type of flex (its module is private to burn-autodiff).
type AdTensor<C> = FloatTensor<Autodiff<Flex, C>>;

/// A batch of images' planes: x[n, c] is the `h·w` values at (n·C + c)·h·w.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// The shape of a 4-dimensional tensor.
pub(crate) fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// A contiguous `[N, C, H, W]` tensor and its dims.
pub(crate) fn planes(t: &FlexTensor) -> (FlexTensor, Dims) {
    let [n, c, h, w] = dims4(t);
    (contiguous(t), Dims { n, c, h, w })
}

/// The batch norm's per-channel numbers, read from its `[C]` tensors.
pub(crate) struct Affine {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub mean: Vec<f32>,
    /// s_c = 1/√(σ²_c + ε)
    pub inv_std: Vec<f32>,
}

impl Affine {
    pub(crate) fn new(
        gamma: &FlexTensor,
        beta: &FlexTensor,
        mean: &FlexTensor,
        var: &FlexTensor,
        epsilon: f64,
    ) -> Self {
        let read = |t: &FlexTensor| f32s(&contiguous(t)).to_vec();
        Affine {
            gamma: read(gamma),
            beta: read(beta),
            mean: read(mean),
            inv_std: read(var)
                .iter()
                .map(|&v| (1.0 / (v as f64 + epsilon).sqrt()) as f32)
                .collect(),
        }
    }

    /// y = a_c·x + b_c with a_c = γ_c·s_c, b_c = β_c − μ_c·a_c.
    pub(crate) fn scale_shift(&self) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> = self
            .gamma
            .iter()
            .zip(&self.inv_std)
            .map(|(g, s)| g * s)
            .collect();
        let shift = scale
            .iter()
            .zip(self.beta.iter().zip(&self.mean))
            .map(|(a, (b, m))| b - m * a)
            .collect();
        (scale, shift)
    }
}

/// The loops, on contiguous `[N, C, H, W]` slices; parallel over channels or planes.
pub(crate) mod kernels {
    use super::{Affine, Dims};
    use crate::ops::{fill_uninit, written_in_full};
    use rayon::prelude::*;
    use std::mem::MaybeUninit;

    /// Σ v, in 8 lanes so that it vectorises.
    pub fn sum(v: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let chunks = v.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for k in 0..8 {
                acc[k] += c[k];
            }
        }
        acc.iter().sum::<f32>() + rest
    }

    /// Σ (v − m)², in 8 lanes.
    fn sum_sq_dev(v: &[f32], m: f32) -> f32 {
        let mut acc = [0.0f32; 8];
        let chunks = v.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().map(|x| (x - m) * (x - m)).sum();
        for c in chunks {
            for k in 0..8 {
                acc[k] += (c[k] - m) * (c[k] - m);
            }
        }
        acc.iter().sum::<f32>() + rest
    }

    fn plane(x: &[f32], d: Dims, n: usize, c: usize) -> &[f32] {
        let hw = d.h * d.w;
        &x[(n * d.c + c) * hw..][..hw]
    }

    /// (μ_c, σ²_c) for every channel, two passes per channel (planes summed in f32, the
    /// batch in f64).
    pub fn channel_stats(x: &[f32], d: Dims) -> (Vec<f32>, Vec<f32>) {
        let count = (d.n * d.h * d.w) as f64;
        (0..d.c)
            .into_par_iter()
            .map(|c| {
                let total: f64 = (0..d.n).map(|n| sum(plane(x, d, n, c)) as f64).sum();
                let mean = (total / count) as f32;
                let sq: f64 = (0..d.n)
                    .map(|n| sum_sq_dev(plane(x, d, n, c), mean) as f64)
                    .sum();
                (mean, (sq / count) as f32)
            })
            .unzip()
    }

    /// The window at output (i, j) of a plane: its 4 offsets in the plane, row by row.
    #[inline]
    fn window(w: usize, i: usize, j: usize) -> [usize; 4] {
        let top = 2 * i * w + 2 * j;
        [top, top + 1, top + w, top + w + 1]
    }

    /// Index (0..4) of the first largest of a·x + b over the window, and that value.
    #[inline]
    fn argmax(p: &[f32], at: [usize; 4], a: f32, b: f32) -> (usize, f32) {
        let mut best = (0, a * p[at[0]] + b);
        for (k, &o) in at.iter().enumerate().skip(1) {
            let v = a * p[o] + b;
            if v > best.1 {
                best = (k, v);
            }
        }
        best
    }

    /// z[n, c, i, j] = max(0, max over the 2×2 window of a_c·x + b_c).
    pub fn affine_pool_relu(x: &[f32], d: Dims, scale: &[f32], shift: &[f32]) -> Vec<f32> {
        let (oh, ow) = (d.h / 2, d.w / 2);
        let hw = d.h * d.w;
        let planes = |z: &mut [MaybeUninit<f32>]| {
            z.par_chunks_mut((oh * ow).max(1))
                .with_min_len(8)
                .enumerate()
                .for_each(|(p, out)| {
                    let c = p % d.c;
                    let (a, b) = (scale[c], shift[c]);
                    pool_plane(&x[p * hw..][..hw], d.w, a, b, out);
                })
        };
        // SAFETY: `pool_plane` writes each of its plane's H/2 × W/2 outputs; the planes cover z.
        unsafe { written_in_full(d.n * d.c * oh * ow, planes) }
    }

    widest_simd! {
        /// One plane of [`affine_pool_relu`] (`out` holds its H/2 × W/2 values).
        fn pool_plane(plane: &[f32], w: usize, a: f32, b: f32, out: &mut [MaybeUninit<f32>]) => pool_plane_body
    }

    #[inline(always)]
    fn pool_plane_body(plane: &[f32], w: usize, a: f32, b: f32, out: &mut [MaybeUninit<f32>]) {
        let ow = w / 2;
        if ow == 0 {
            return;
        }
        for (rows, out) in plane.chunks_exact(2 * w).zip(out.chunks_exact_mut(ow)) {
            let (top, bottom) = rows.split_at(w);
            let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
            for (o, (t, u)) in out.iter_mut().zip(pairs) {
                let v = (a * t[0] + b)
                    .max(a * t[1] + b)
                    .max(a * u[0] + b)
                    .max(a * u[1] + b);
                o.write(v.max(0.0));
            }
        }
    }

    /// ∂L/∂x of relu(pool(x)): g goes to the window's first largest value where it is > 0.
    pub fn pool_relu_backward(x: &[f32], g: &[f32], d: Dims) -> Vec<f32> {
        let (oh, ow) = (d.h / 2, d.w / 2);
        let hw = d.h * d.w;
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(hw)
            .with_min_len(8)
            .enumerate()
            .for_each(|(p, out)| {
                let plane = &x[p * hw..][..hw];
                let gp = &g[p * oh * ow..][..oh * ow];
                for i in 0..oh {
                    for j in 0..ow {
                        let at = window(d.w, i, j);
                        let (k, v) = argmax(plane, at, 1.0, 0.0);
                        if v > 0.0 {
                            out[at[k]] = gp[i * ow + j];
                        }
                    }
                }
            });
        dx
    }

    /// (∂L/∂x, ∂L/∂γ, ∂L/∂β) of relu(pool(batch_norm(x))), the module docs' formulas.
    pub fn norm_pool_relu_backward(
        x: &[f32],
        g: &[f32],
        d: Dims,
        bn: &Affine,
        batch_stats: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (oh, ow) = (d.h / 2, d.w / 2);
        let (hw, ohw) = (d.h * d.w, oh * ow);
        let (scale, shift) = bn.scale_shift();
        // Pass 1, per channel: where each window's gradient goes (NONE where z = 0), and the
        // sums ∂L/∂β_c = Σ dy, ∂L/∂γ_c = Σ dy·x̂.
        let per_channel: Vec<(f32, f32, Vec<u8>)> = (0..d.c)
            .into_par_iter()
            .map(|c| {
                let (s, m) = (bn.inv_std[c], bn.mean[c]);
                let (a, b) = (scale[c], shift[c]);
                let (mut dbeta, mut dgamma) = (0.0f64, 0.0f64);
                let mut route = vec![NONE; d.n * ohw];
                for (n, route) in route.chunks_exact_mut(ohw.max(1)).enumerate() {
                    let gp = &g[(n * d.c + c) * ohw..][..ohw];
                    let (db, dg) = route_plane(plane(x, d, n, c), d.w, [a, b, m], gp, route);
                    dbeta += db as f64;
                    dgamma += dg as f64 * s as f64;
                }
                (dbeta as f32, dgamma as f32, route)
            })
            .collect();
        let count = (d.n * hw) as f32;
        // Pass 2, per plane: ∂L/∂x = k·dy + c0 + c1·x with k = γ·s,
        // c1 = −k·s·(∂L/∂γ)/M and c0 = −k·(∂L/∂β)/M − c1·μ (0 and 0 with running statistics).
        let planes = |dx: &mut [MaybeUninit<f32>]| {
            dx.par_chunks_mut(hw.max(1))
                .with_min_len(8)
                .enumerate()
                .for_each(|(p, out)| {
                    let (n, c) = (p / d.c, p % d.c);
                    let (dbeta, dgamma, route) = &per_channel[c];
                    let (s, m, k) = (bn.inv_std[c], bn.mean[c], scale[c]);
                    let (c0, c1) = if batch_stats {
                        let c1 = -k * s * dgamma / count;
                        (-k * dbeta / count - c1 * m, c1)
                    } else {
                        (0.0, 0.0)
                    };
                    let gp = &g[p * ohw..][..ohw];
                    let rp = &route[n * ohw..][..ohw];
                    spread_plane(&x[p * hw..][..hw], d.w, [c0, c1, k], gp, rp, out);
                })
        };
        // SAFETY: `spread_plane` writes every value of its plane; the planes cover x.
        let dx = unsafe { written_in_full(x.len(), planes) };
        let (dgamma, dbeta) = per_channel.iter().map(|(db, dg, _)| (*dg, *db)).unzip();
        (dx, dgamma, dbeta)
    }

    /// Where no window's gradient goes: relu(pool(·)) is 0 there.
    const NONE: u8 = 4;

    widest_simd! {
        /// Pass 1 of [`norm_pool_relu_backward`] for one plane: each window's route (the
        /// index, row by row, of its first largest a·x + b; [`NONE`] where that is ≤ 0) and
        /// (Σ dy, Σ dy·(x − μ)) over the plane, with [a, b, μ] and the plane's gradient gp.
        fn route_plane(plane: &[f32], w: usize, abm: [f32; 3], gp: &[f32], route: &mut [u8]) -> (f32, f32) => route_plane_body
    }

    #[inline(always)]
    fn route_plane_body(
        plane: &[f32],
        w: usize,
        [a, b, m]: [f32; 3],
        gp: &[f32],
        route: &mut [u8],
    ) -> (f32, f32) {
        let ow = w / 2;
        if ow == 0 {
            return (0.0, 0.0);
        }
        let (mut gsel, mut xsel) = (vec![0.0f32; ow], vec![0.0f32; ow]);
        let (mut db, mut dg) = (0.0f32, 0.0f32);
        let rows = plane.chunks_exact(2 * w).zip(gp.chunks_exact(ow));
        for ((rows, g), route) in rows.zip(route.chunks_exact_mut(ow)) {
            let (top, bottom) = rows.split_at(w);
            let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
            let out = route.iter_mut().zip(gsel.iter_mut().zip(xsel.iter_mut()));
            for ((t, u), ((r, (gs, xs)), &gv)) in pairs.zip(out.zip(g)) {
                // The first largest of the four, as a tournament: ties go to the earlier.
                let (t0, t1, u0, u1) = (a * t[0] + b, a * t[1] + b, a * u[0] + b, a * u[1] + b);
                let (m01, k01, x01) = if t1 > t0 {
                    (t1, 1, t[1])
                } else {
                    (t0, 0, t[0])
                };
                let (m23, k23, x23) = if u1 > u0 {
                    (u1, 3, u[1])
                } else {
                    (u0, 2, u[0])
                };
                let (v, k, xk) = if m23 > m01 {
                    (m23, k23, x23)
                } else {
                    (m01, k01, x01)
                };
                let on = v > 0.0;
                *r = if on { k } else { NONE };
                *gs = if on { gv } else { 0.0 };
                *xs = *gs * (xk - m);
            }
            db += sum(&gsel);
            dg += sum(&xsel);
        }
        (db, dg)
    }

    widest_simd! {
        /// Pass 2 of [`norm_pool_relu_backward`] for one plane: out = c0 + c1·x, plus k·dy at
        /// each window's routed position, with [c0, c1, k].
        fn spread_plane(plane: &[f32], w: usize, coef: [f32; 3], gp: &[f32], route: &[u8], out: &mut [MaybeUninit<f32>]) => spread_plane_body
    }

    #[inline(always)]
    fn spread_plane_body(
        plane: &[f32],
        w: usize,
        [c0, c1, k]: [f32; 3],
        gp: &[f32],
        route: &[u8],
        out: &mut [MaybeUninit<f32>],
    ) {
        assert_eq!(out.len(), plane.len());
        for (o, &v) in out.iter_mut().zip(plane) {
            o.write(c0 + c1 * v);
        }
        // SAFETY: every value was written just above (out is as long as the plane).
        let out = unsafe { out.assume_init_mut() };
        let ow = w / 2;
        if ow == 0 {
            return;
        }
        let rows = out.chunks_exact_mut(2 * w).zip(gp.chunks_exact(ow));
        for ((rows, g), route) in rows.zip(route.chunks_exact(ow)) {
            let (top, bottom) = rows.split_at_mut(w);
            let pairs = top.chunks_exact_mut(2).zip(bottom.chunks_exact_mut(2));
            for ((t, u), (&r, &gv)) in pairs.zip(route.iter().zip(g)) {
                let kg = k * gv;
                let at = |q: u8| if r == q { kg } else { 0.0 };
                t[0] += at(0);
                t[1] += at(1);
                u[0] += at(2);
                u[1] += at(3);
            }
        }
    }

    /// im2col, one row per weight column: cols[(c, i, j), (n, y, x)] = x_pad[n, c, y + i, x + j]
    /// for an output of `out` = [H', W'] positions, with `padding` zeros on each side.
    pub fn im2col_rows(
        x: &[f32],
        d: Dims,
        kernel: [usize; 2],
        padding: [usize; 2],
        out: [usize; 2],
    ) -> Vec<f32> {
        let len = d.c * kernel[0] * kernel[1] * d.n * out[0] * out[1];
        // SAFETY: `im2col_rows_into` writes every value of `cols` (padding included).
        unsafe {
            written_in_full(len, |cols| {
                im2col_rows_into(cols, x, d, kernel, padding, out)
            })
        }
    }

    /// [`im2col_rows`] into `cols`, every value written (the padding as zeros), none read.
    pub fn im2col_rows_into(
        cols: &mut [MaybeUninit<f32>],
        x: &[f32],
        d: Dims,
        [kh, kw]: [usize; 2],
        [ph, pw]: [usize; 2],
        [oh, ow]: [usize; 2],
    ) {
        let per_row = d.n * oh * ow;
        cols.par_chunks_mut(per_row)
            .enumerate()
            .for_each(|(r, row)| {
                let (c, i, j) = (r / (kh * kw), r / kw % kh, r % kw);
                // Output columns x whose input column x + j − pw lies inside 0..W.
                let x_lo = pw.saturating_sub(j).min(ow);
                let x_hi = (d.w + pw).saturating_sub(j).min(ow).max(x_lo);
                for n in 0..d.n {
                    let src = plane(x, d, n, c);
                    for y in 0..oh {
                        let dst = &mut row[(n * oh + y) * ow..][..ow];
                        let Some(sy) = (y + i).checked_sub(ph).filter(|&sy| sy < d.h) else {
                            fill_uninit(dst, 0.0);
                            continue;
                        };
                        let (left, rest) = dst.split_at_mut(x_lo);
                        let (mid, right) = rest.split_at_mut(x_hi - x_lo);
                        if !mid.is_empty() {
                            let from = sy * d.w + x_lo + j - pw;
                            mid.write_copy_of_slice(&src[from..][..mid.len()]);
                        }
                        fill_uninit(left, 0.0);
                        fill_uninit(right, 0.0);
                    }
                }
            });
    }

    /// out[n, f, p] = b_f + Σ_k W[f, k]·cols[n, k, p], with `d` = (N, K = C·k², H', W').
    pub fn first_conv_forward(cols: &[f32], d: Dims, weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let (k, p) = (d.c, d.h * d.w);
        let filters = bias.len();
        let len = d.n * filters * p;
        let images = |out: &mut [MaybeUninit<f32>]| {
            if len > 0 {
                out.par_chunks_mut(filters * p)
                    .zip(cols.par_chunks(k * p))
                    .for_each(|(out, cols)| first_conv_image(cols, weight, bias, out));
            }
        };
        // SAFETY: `first_conv_image` writes every value of its image's `[F, P]` (each row
        // starts as the bias), and the images cover the buffer.
        unsafe { written_in_full(len, images) }
    }

    widest_simd! {
        /// One image of [`first_conv_forward`]: `cols` `[K, P]`, `out` `[F, P]`.
        fn first_conv_image(cols: &[f32], weight: &[f32], bias: &[f32], out: &mut [MaybeUninit<f32>]) => first_conv_image_body
    }

    #[inline(always)]
    fn first_conv_image_body(
        cols: &[f32],
        weight: &[f32],
        bias: &[f32],
        out: &mut [MaybeUninit<f32>],
    ) {
        let filters = bias.len();
        if filters == 0 || out.is_empty() {
            return;
        }
        let p = out.len() / filters;
        let k = weight.len() / filters;
        for (f, row) in out.chunks_mut(p).enumerate() {
            let row = fill_uninit(row, bias[f]);
            for (kk, col) in cols.chunks(p).take(k).enumerate() {
                let w = weight[f * k + kk];
                for (o, c) in row.iter_mut().zip(col) {
                    *o += w * c;
                }
            }
        }
    }

    /// Σ a·b, in 8 lanes.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let rest: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        acc.iter().sum::<f32>() + rest
    }

    /// (∂L/∂W [F·K], ∂L/∂b [F]) of [`first_conv_forward`], given g = ∂L/∂out [N, F, P].
    pub fn first_conv_backward(
        cols: &[f32],
        d: Dims,
        g: &[f32],
        filters: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (k, p) = (d.c, d.h * d.w);
        // Fixed groups of 8 images, summed in order: the same result on every run and any
        // number of threads (rayon's fold would add in the order work was stolen).
        const GROUP: usize = 8;
        let partials: Vec<(Vec<f32>, Vec<f32>)> = g
            .par_chunks(GROUP * filters * p)
            .zip(cols.par_chunks(GROUP * k * p))
            .map(|(g, cols)| {
                let (mut dw, mut db) = (vec![0.0f32; filters * k], vec![0.0f32; filters]);
                for (g, cols) in g.chunks(filters * p).zip(cols.chunks(k * p)) {
                    for (f, grow) in g.chunks(p).enumerate() {
                        db[f] += sum(grow);
                        for (kk, col) in cols.chunks(p).enumerate() {
                            dw[f * k + kk] += dot(grow, col);
                        }
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0.0f32; filters * k], vec![0.0f32; filters]);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(x, y)| *x += y);
            db.iter_mut().zip(pb).for_each(|(x, y)| *x += y);
        }
        (dw, db)
    }

    /// `[N, F, P]` → `[F, N·P]`: the output gradient as one row per filter.
    pub fn batch_to_rows(g: &[f32], d: Dims) -> Vec<f32> {
        let p = d.h * d.w;
        let filters = |rows: &mut [MaybeUninit<f32>]| {
            rows.par_chunks_mut((d.n * p).max(1))
                .enumerate()
                .for_each(|(f, row)| {
                    for n in 0..d.n {
                        row[n * p..][..p].write_copy_of_slice(plane(g, d, n, f));
                    }
                })
        };
        // SAFETY: every filter's row gets each image's plane of p values, so all are written.
        unsafe { written_in_full(g.len(), filters) }
    }
}

/// Burn's `conv` (stride 1, zero padding as configured) computed as im2col and one batched
/// matrix product:
/// out[n, f, p] = b_f + Σ_{c,i,j} W[f, c, i, j] · x_pad[n, c, y_p + i, x_p + j],
/// with cols[n, (c, i, j), p] = x_pad[n, c, y_p + i, x_p + j] gathered by k² slices.
/// Other strides, dilations and groups go to Burn's convolution.
pub fn conv2d_im2col(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val();
    let [filters, channels, kh, kw] = weight.dims();
    let [batch, _, height, width] = x.dims();
    // (top, bottom, left, right); None: not stride 1, or an even kernel with same padding.
    let Some(pads) = stride1_pads(conv) else {
        return conv.forward(x);
    };
    let (top, bottom, left, right) = pads;
    let x = if pads != (0, 0, 0, 0) {
        x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0))
    } else {
        x
    };
    let (oh, ow) = (
        height + top + bottom + 1 - kh,
        width + left + right + 1 - kw,
    );
    let mut shifted = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            shifted.push(
                x.clone()
                    .slice([0..batch, 0..channels, i..i + oh, j..j + ow]),
            );
        }
    }
    // [batch, c, k², oh, ow] → [batch, c·k², oh·ow]: rows ordered (c, i, j) as W's columns.
    let cols = Tensor::stack::<5>(shifted, 2).reshape([batch, channels * kh * kw, oh * ow]);
    let w = weight.reshape([1, filters, channels * kh * kw]);
    let mut out = w.matmul(cols); // [batch, filters, oh·ow]
    if let Some(bias) = &conv.bias {
        out = out + bias.val().reshape([1, filters, 1]);
    }
    out.reshape([batch, filters, oh, ow])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{close, to_vec};
    use burn::module::{Module, Param};
    use burn::nn::BatchNormConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::tensor::{Device, Distribution};

    /// A batch norm with random γ, β (both signs) and running statistics.
    fn norm(channels: usize, d: &Device) -> BatchNorm {
        let mut bn = BatchNormConfig::new(channels).init(d);
        let r = |lo, hi| Tensor::<1>::random([channels], Distribution::Uniform(lo, hi), d);
        bn.gamma = Param::from_tensor(r(-1.5, 1.5));
        bn.beta = Param::from_tensor(r(-0.5, 0.5));
        bn.running_mean.update(r(-1.0, 1.0));
        bn.running_var.update(r(0.5, 2.0));
        bn
    }

    /// Fused and Burn's operations agree on the output, on ∂L/∂x, ∂L/∂γ, ∂L/∂β and on the
    /// running averages, while training (batch statistics) and in evaluation, with and
    /// without batch norm, on even and odd sides (the pool drops the last row and column).
    #[test]
    fn fused_block_tail_matches_burn() {
        let d = Device::flex().autodiff();
        d.seed(5);
        let pool = MaxPool2dConfig::new([2, 2]).init();
        for [n, c, h, w] in [[3, 4, 6, 6], [2, 3, 7, 5], [5, 2, 2, 3]] {
            for with_norm in [true, false] {
                let what = format!("{n}×{c}×{h}×{w}, batch norm {with_norm}");
                let bn = with_norm.then(|| norm(c, &d));
                let bn2 = bn.clone();
                let x = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.3, 1.0), &d)
                    .require_grad();
                let x2 = x.clone().detach().require_grad();
                // A loss with a different weight on every output.
                let r =
                    Tensor::<4>::random([n, c, h / 2, w / 2], Distribution::Normal(0.0, 1.0), &d);
                let ours = block_tail(bn.as_ref(), &pool, x.clone());
                let burns = block_tail_reference(bn2.as_ref(), &pool, x2.clone());
                close(&to_vec(ours.clone()), &to_vec(burns.clone()), 1e-5, &what);
                let g1 = (ours * r.clone()).sum().backward();
                let g2 = (burns * r).sum().backward();
                let grad = |t: &Tensor<4>, g| to_vec(t.grad(g).unwrap());
                close(&grad(&x, &g1), &grad(&x2, &g2), 1e-4, &format!("∂x {what}"));
                if let (Some(a), Some(b)) = (&bn, &bn2) {
                    let grad1 = |t: &Param<Tensor<1>>, g| to_vec(t.grad(g).unwrap());
                    close(&grad1(&a.gamma, &g1), &grad1(&b.gamma, &g2), 1e-4, "∂γ");
                    close(&grad1(&a.beta, &g1), &grad1(&b.beta, &g2), 1e-4, "∂β");
                    let state = |t: &BatchNorm| {
                        (
                            to_vec(t.running_mean.value()),
                            to_vec(t.running_var.value()),
                        )
                    };
                    let ((m1, v1), (m2, v2)) = (state(a), state(b));
                    close(&m1, &m2, 1e-5, "running mean");
                    close(&v1, &v2, 1e-5, "running var");
                    // Evaluation (no autodiff): the running averages.
                    let xe = x.clone().inner();
                    let e1 = block_tail(Some(&a.clone().valid()), &pool, xe.clone());
                    let e2 = block_tail_reference(Some(&b.clone().valid()), &pool, xe);
                    close(&to_vec(e1), &to_vec(e2), 1e-5, &format!("eval {what}"));
                }
            }
        }
    }

    /// Max-pool ties: with many equal values in a window (integers 0..2, no batch norm, whose
    /// normalisation would make them distinct only by rounding), the gradient goes where
    /// Burn's goes.
    #[test]
    fn pool_ties_follow_burn() {
        let d = Device::flex().autodiff();
        d.seed(9);
        let pool = MaxPool2dConfig::new([2, 2]).init();
        let shape = [2, 3, 6, 6];
        let ints = Tensor::<4>::random(shape, Distribution::Uniform(0.0, 3.0), &d).floor();
        let values = to_vec(ints.clone());
        assert!(
            values.chunks(2).filter(|p| p[0] == p[1]).count() > 20,
            "the input has ties"
        );
        let x = ints.detach().require_grad();
        let x2 = x.clone().detach().require_grad();
        let r = Tensor::<4>::random([2, 3, 3, 3], Distribution::Normal(0.0, 1.0), &d);
        let g1 = (block_tail(None, &pool, x.clone()) * r.clone())
            .sum()
            .backward();
        let g2 = (block_tail_reference(None, &pool, x2.clone()) * r)
            .sum()
            .backward();
        close(
            &to_vec(x.grad(&g1).unwrap()),
            &to_vec(x2.grad(&g2).unwrap()),
            1e-6,
            "∂x with ties",
        );
    }

    /// The weight gradient accumulated over several chunks: 16 channels of 32×32 with a 5×5
    /// kernel make 409,600 column values per image, so a chunk of 2²¹ values holds 5 images
    /// and a batch of 13 takes three chunks (5, 5, 3).
    #[test]
    fn conv2d_weight_gradient_over_several_chunks() {
        use burn::nn::conv::Conv2dConfig;
        let d = Device::flex().autodiff();
        d.seed(13);
        let conv = Conv2dConfig::new([16, 3], [5, 5])
            .with_padding(PaddingConfig2d::Same)
            .init(&d);
        let x = Tensor::<4>::random([13, 16, 32, 32], Distribution::Normal(0.0, 1.0), &d)
            .require_grad();
        let x2 = x.clone().detach().require_grad();
        let ours = conv2d(&conv, x.clone());
        let burns = conv.forward(x2.clone());
        let r = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &d);
        let g1 = (ours * r.clone()).sum().backward();
        let g2 = (burns * r).sum().backward();
        let w = |g| to_vec(conv.weight.grad(g).unwrap());
        close(&w(&g1), &w(&g2), 1e-3, "∂W over chunks");
        let b = |g| to_vec(conv.bias.as_ref().unwrap().grad(g).unwrap());
        close(&b(&g1), &b(&g2), 1e-3, "∂b over chunks");
    }

    /// The first convolution's weight gradient summed over groups of 8 images: a batch of 19
    /// is two full groups and a remainder of 3.
    #[test]
    fn constant_input_conv2d_over_several_groups() {
        use burn::nn::conv::Conv2dConfig;
        let d = Device::flex().autodiff();
        d.seed(14);
        let conv = Conv2dConfig::new([1, 6], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .init(&d);
        let x = Tensor::<4>::random([19, 1, 9, 8], Distribution::Normal(0.0, 1.0), &d);
        let ours = conv2d_constant_input(&conv, x.clone());
        let burns = conv.forward(x);
        let r = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &d);
        let g1 = (ours * r.clone()).sum().backward();
        let g2 = (burns * r).sum().backward();
        let w = |g| to_vec(conv.weight.grad(g).unwrap());
        close(&w(&g1), &w(&g2), 1e-4, "∂W over groups");
        let b = |g| to_vec(conv.bias.as_ref().unwrap().grad(g).unwrap());
        close(&b(&g1), &b(&g2), 1e-4, "∂b over groups");
    }

    /// The stride-1 convolution (flex's forward, kiln's weight gradient) agrees with Burn's
    /// Conv2d on the output and on ∂L/∂x, ∂L/∂W, ∂L/∂b, for same, valid and explicit padding.
    #[test]
    fn conv2d_matches_burn() {
        use burn::nn::conv::Conv2dConfig;
        let d = Device::flex().autodiff();
        d.seed(11);
        for (channels, kernel, padding, bias) in [
            (1, 3, PaddingConfig2d::Same, true),
            (3, 3, PaddingConfig2d::Valid, true),
            (2, 5, PaddingConfig2d::Same, true),
            (4, 3, PaddingConfig2d::Explicit(2, 1, 2, 1), true),
            (4, 3, PaddingConfig2d::Explicit(1, 1, 1, 1), false),
            (3, 1, PaddingConfig2d::Valid, false),
        ] {
            let what = format!("{channels} channels, {kernel}×{kernel}, {padding:?}, bias {bias}");
            let conv = Conv2dConfig::new([channels, 5], [kernel, kernel])
                .with_padding(padding)
                .with_bias(bias)
                .init(&d);
            let x = Tensor::<4>::random([3, channels, 8, 7], Distribution::Normal(0.0, 1.0), &d)
                .require_grad();
            let x2 = x.clone().detach().require_grad();
            let ours = conv2d(&conv, x.clone());
            let burns = conv.forward(x2.clone());
            assert_eq!(ours.dims(), burns.dims(), "{what}");
            close(&to_vec(ours.clone()), &to_vec(burns.clone()), 1e-5, &what);
            let r = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &d);
            let g1 = (ours * r.clone()).sum().backward();
            let g2 = (burns * r).sum().backward();
            close(
                &to_vec(x.grad(&g1).unwrap()),
                &to_vec(x2.grad(&g2).unwrap()),
                1e-4,
                "∂x",
            );
            let w = |g| to_vec(conv.weight.grad(g).unwrap());
            close(&w(&g1), &w(&g2), 1e-4, &format!("∂W {what}"));
            if let Some(bias) = &conv.bias {
                let b = |g| to_vec(bias.grad(g).unwrap());
                close(&b(&g1), &b(&g2), 1e-4, &format!("∂b {what}"));
            }
        }
    }

    /// The first-layer convolution (input without gradient) agrees with Burn's Conv2d on the
    /// output and on ∂L/∂W, ∂L/∂b, for same and valid padding and C·k² up to 32 and beyond
    /// (where it hands over to `conv2d`).
    #[test]
    fn constant_input_conv2d_matches_burn() {
        use burn::nn::conv::Conv2dConfig;
        let d = Device::flex().autodiff();
        d.seed(12);
        for (channels, kernel, padding) in [
            (1, 3, PaddingConfig2d::Same),
            (1, 3, PaddingConfig2d::Valid),
            (3, 3, PaddingConfig2d::Same),
            (1, 5, PaddingConfig2d::Valid),
            (2, 5, PaddingConfig2d::Same),
            (1, 3, PaddingConfig2d::Explicit(1, 2, 1, 2)),
        ] {
            let what = format!("{channels} channels, {kernel}×{kernel}, {padding:?}");
            let conv = Conv2dConfig::new([channels, 6], [kernel, kernel])
                .with_padding(padding)
                .init(&d);
            let x = Tensor::<4>::random([4, channels, 9, 8], Distribution::Normal(0.0, 1.0), &d);
            let ours = conv2d_constant_input(&conv, x.clone());
            let burns = conv.forward(x);
            assert_eq!(ours.dims(), burns.dims(), "{what}");
            close(&to_vec(ours.clone()), &to_vec(burns.clone()), 1e-5, &what);
            let r = Tensor::<4>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &d);
            let g1 = (ours * r.clone()).sum().backward();
            let g2 = (burns * r).sum().backward();
            let w = |g| to_vec(conv.weight.grad(g).unwrap());
            close(&w(&g1), &w(&g2), 1e-4, &format!("∂W {what}"));
            if let Some(bias) = &conv.bias {
                let b = |g| to_vec(bias.grad(g).unwrap());
                close(&b(&g1), &b(&g2), 1e-4, &format!("∂b {what}"));
            }
        }
    }

    /// A frozen batch norm (partial fine-tuning: still on the autodiff device, training flag
    /// off) uses its running averages as constants: ∂L/∂x = γ·s·dy, as Burn's.
    #[test]
    fn frozen_block_tail_matches_burn() {
        let d = Device::flex().autodiff();
        d.seed(6);
        let pool = MaxPool2dConfig::new([2, 2]).init();
        let bn = norm(3, &d).freeze();
        let x =
            Tensor::<4>::random([2, 3, 6, 5], Distribution::Normal(0.3, 1.0), &d).require_grad();
        let x2 = x.clone().detach().require_grad();
        let r = Tensor::<4>::random([2, 3, 3, 2], Distribution::Normal(0.0, 1.0), &d);
        let ours = block_tail(Some(&bn), &pool, x.clone());
        let burns = block_tail_reference(Some(&bn), &pool, x2.clone());
        close(
            &to_vec(ours.clone()),
            &to_vec(burns.clone()),
            1e-5,
            "frozen",
        );
        let g1 = (ours * r.clone()).sum().backward();
        let g2 = (burns * r).sum().backward();
        close(
            &to_vec(x.grad(&g1).unwrap()),
            &to_vec(x2.grad(&g2).unwrap()),
            1e-4,
            "∂x frozen",
        );
    }
}
