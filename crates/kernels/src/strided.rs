//! Convolutions and transposed convolutions of any stride and zero padding (no dilation, no
//! groups) as flex operations: im2col or col2im around matrix products, forward and backward
//! (a Burn backend extension, `#[backend_extension(Flex, Autodiff)]`). The DCGAN's
//! discriminator (4×4, stride 2) and generator (4×4 transposed, stride 2), the convolutional
//! autoencoder, ResNet's down-sampling convolutions and the CNN's stride-1 forward pass and ∂x
//! run here on flex; every other backend, and any layer these do not cover, takes Burn's own
//! operations, and unit tests check that both give the same values and gradients.
//!
//! The batch goes through in chunks whose im2col columns fit in one core's L2 cache
//! (`CHUNK_VALUES`); chunks run in parallel, each with its own single-threaded products, and
//! the backward pass makes one pass over them, each chunk's operands serving both products.
//! im2col is a gather from zero-padded planes. On the DCGAN's training step (docs/performance.md,
//! GAN) this took `kiln bench gan` from 1.15–1.16k to 1.65–1.77k images/s.
//!
//! # One window, three products
//!
//! A convolution reads an image x `[C, H, W]` through a k_h × k_w window moved by the stride s
//! over x padded with p zeros, giving H' × W' positions. im2col lays the windows out as columns,
//!
//! cols[(c, i, j), (n, y, x)] = x_pad[n, c, y·s + i, x·s + j],
//!
//! a `[C·k², N·H'·W']` matrix (N images side by side), and col2im is its adjoint: each column
//! entry added back to the input position it was read from. With the weight W as `[F, C·k²]`
//! and an output y as rows Y `[F, N·H'·W']`, everything is one of three products:
//!
//! - **correlate**: Y = W · cols(x) — a convolution's forward pass;
//! - **scatter**: x = col2im(Wᵀ · Y) — a convolution's ∂L/∂x, and a transposed convolution's
//!   forward pass (the transposed convolution is the convolution's adjoint, so its weight
//!   `[C_in, C_out, k_h, k_w]` is the `[F, C·k²]` of the convolution from its output back to
//!   its input);
//! - **weight**: ∂L/∂W = Y · cols(x)ᵀ — a convolution's weight gradient (Y = ∂L/∂out), and a
//!   transposed convolution's (x = ∂L/∂out read as an image, Y its input).
//!
//! So: convolution — out = correlate(x) + b, ∂L/∂x = scatter(G), ∂L/∂W = weight(x, G);
//! transposed convolution — out = scatter(x) + b, ∂L/∂x = correlate(G), ∂L/∂W = weight(G, x);
//! ∂L/∂b_f = Σ_{n,p} G[n, f, p] for both. Burn's default backward computes the weight gradient
//! as a convolution with the batch as channels (transposing copies of x and G around a dilated
//! convolution), and flex's transposed convolution scatters its columns one value at a time.

use crate::conv::kernels::{batch_to_rows, sum};
use crate::conv::{Dims, dims4};
use crate::ops::{
    contiguous, f32s, new_product, on_flex_f32, rows, tensor, transposed, written_in_full,
};
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

#[backend_extension(Flex, Autodiff)]
pub trait StridedOps: Backend {
    /// Burn's `conv2d` with `stride`, `padding` zeros on each side, no dilation and no groups:
    /// `[N, C, H, W]` → `[N, F, H', W']`, H' = (H + 2p − k)/s + 1.
    fn conv2d_strided(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;

    /// Burn's `conv_transpose2d` with `stride`, `padding`, no dilation and no groups:
    /// `[N, C_in, H, W]` → `[N, C_out, size[0], size[1]]`, size = (H − 1)·s − 2p + k (plus
    /// Burn's `padding_out`).
    fn conv_transpose2d_strided(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        size: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// A convolution layer's forward pass, `[N, C, H, W]` → `[N, F, H', W']`: on flex, any stride
/// with the same zero padding on both sides of each axis (no dilation or groups) runs as the
/// module docs' products; everything else is Burn's own convolution.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match symmetric_padding(conv) {
        Some(padding) if covered(conv.dilation, conv.groups) && on_flex_f32(&x) => {
            let weight = conv.weight.val();
            let bias = bias_or_zeros(conv.bias.as_ref().map(|b| b.val()), &weight, 0);
            Tensor::from_dispatch(<Dispatch as StridedOps>::conv2d_strided(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                conv.stride,
                padding,
            ))
        }
        _ => conv.forward(x),
    }
}

/// A transposed convolution layer's forward pass, `[N, C_in, H, W]` → `[N, C_out, H'', W'']`
/// with H'' = (H − 1)·s − 2p + k + padding_out: on flex (no dilation or groups) the module
/// docs' scatter; everything else is Burn's own.
pub fn conv_transpose2d(conv: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let [_, _, kh, kw] = conv.weight.dims();
    let side = |n: usize, k: usize, s: usize, p: usize, extra: usize| {
        ((n.max(1) - 1) * s + k + extra).checked_sub(2 * p)
    };
    let size = (
        side(h, kh, conv.stride[0], conv.padding[0], conv.padding_out[0]),
        side(w, kw, conv.stride[1], conv.padding[1], conv.padding_out[1]),
    );
    match size {
        (Some(oh), Some(ow))
            if covered(conv.dilation, conv.groups) && h > 0 && w > 0 && on_flex_f32(&x) =>
        {
            let weight = conv.weight.val();
            let bias = bias_or_zeros(conv.bias.as_ref().map(|b| b.val()), &weight, 1);
            Tensor::from_dispatch(<Dispatch as StridedOps>::conv_transpose2d_strided(
                x.into_dispatch(),
                weight.into_dispatch(),
                bias.into_dispatch(),
                conv.stride,
                conv.padding,
                [oh, ow],
            ))
        }
        _ => conv.forward(x),
    }
}

fn covered(dilation: [usize; 2], groups: usize) -> bool {
    dilation == [1, 1] && groups == 1
}

/// The layer's bias, or zeros for the `axis` of the weight that counts output channels (a
/// layer without bias runs as one with a constant zero bias, which gets no gradient).
fn bias_or_zeros(bias: Option<Tensor<1>>, weight: &Tensor<4>, axis: usize) -> Tensor<1> {
    bias.unwrap_or_else(|| Tensor::zeros([weight.dims()[axis]], &weight.device()))
}

/// [rows, columns] zeros on each side of a convolution's input, when each side of an axis
/// gets the same (`None` for asymmetric or "same" padding, which Burn handles).
fn symmetric_padding(conv: &Conv2d) -> Option<[usize; 2]> {
    match conv.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

/// A convolution's window over a batch: `image` = [N, C, H, W] planes read by a `kernel`
/// window moved by `stride` over the image padded with `padding` zeros, at `out` = [H', W']
/// positions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub image: Dims,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub out: [usize; 2],
}

impl Window {
    /// C·k_h·k_w: the rows of im2col's matrix.
    fn depth(&self) -> usize {
        self.image.c * self.kernel[0] * self.kernel[1]
    }

    /// H'·W'.
    fn positions(&self) -> usize {
        self.out[0] * self.out[1]
    }

    /// N·H'·W': the columns of im2col's matrix.
    fn columns(&self) -> usize {
        self.image.n * self.positions()
    }
}

/// The output side of a convolution: (n + 2p − k)/s + 1 (0 when the window does not fit).
fn conv_side(n: usize, k: usize, s: usize, p: usize) -> usize {
    (n + 2 * p).checked_sub(k).map_or(0, |v| v / s + 1)
}

/// Images per chunk: one chunk's im2col columns hold about this many values (512 KB, inside
/// one core's L2 cache), so that a chunk's im2col, product and col2im stay in cache; chunks run
/// in parallel, each product on its own thread. The chunks depend on the shapes only, so the
/// weight gradient's sum over chunks is the same on any number of threads.
const CHUNK_VALUES: usize = 1 << 17;

impl Window {
    /// Images per chunk (at least one).
    fn chunk(&self) -> usize {
        (CHUNK_VALUES / (self.depth() * self.positions()).max(1)).clamp(1, self.image.n.max(1))
    }

    /// The same window over `n` images.
    fn with_images(self, n: usize) -> Window {
        Window {
            image: Dims { n, ..self.image },
            ..self
        }
    }

    /// C·H·W: the values of one image.
    fn image_len(&self) -> usize {
        self.image.c * self.image.h * self.image.w
    }

    /// Whether any product or copy has work to do (no empty dimension).
    fn is_empty(&self) -> bool {
        self.image.n == 0 || self.image_len() == 0 || self.positions() == 0 || self.depth() == 0
    }
}

impl Window {
    /// [H + 2p_h, W + 2p_w]: a padded plane's sides (every window lies inside).
    fn padded_sides(&self) -> [usize; 2] {
        [
            self.image.h + 2 * self.padding[0],
            self.image.w + 2 * self.padding[1],
        ]
    }

    /// Where each output position (y, x) reads a padded plane for kernel tap (0, 0):
    /// y·s_h·W_p + x·s_w (tap (i, j) adds i·W_p + j).
    fn offsets(&self) -> Offsets {
        let wp = self.padded_sides()[1];
        let (oh, ow) = (self.out[0], self.out[1]);
        let at = |y: usize, x: usize| (y * self.stride[0] * wp + x * self.stride[1]) as u32;
        let at: Vec<u32> = (0..oh)
            .flat_map(|y| (0..ow).map(move |x| at(y, x)))
            .collect();
        let end = at.iter().map(|&o| o as usize + 1).max().unwrap_or(0);
        Offsets { at, end }
    }
}

/// Offsets into a plane, and one past the largest (what an indexed slice must hold).
struct Offsets {
    at: Vec<u32>,
    end: usize,
}

/// The window's images (x holds them, `[n, C, H, W]`) with the padding's zeros around each
/// plane, `[n, C, H + 2p_h, W + 2p_w]`.
fn padded(x: &[f32], w: Window) -> Vec<f32> {
    let (d, [ph, pw]) = (w.image, w.padding);
    let [hp, wp] = w.padded_sides();
    let mut out = vec![0.0f32; d.n * d.c * hp * wp];
    for (dst, src) in out.chunks_exact_mut(hp * wp).zip(x.chunks_exact(d.h * d.w)) {
        for (row, from) in dst[ph * wp..]
            .chunks_exact_mut(wp)
            .zip(src.chunks_exact(d.w))
        {
            row[pw..pw + d.w].copy_from_slice(from);
        }
    }
    out
}

widest_simd! {
    /// dst[p] = src[offsets[p]], every value of dst written.
    fn gather(dst: &mut [MaybeUninit<f32>], src: &[f32], offsets: &Offsets) => gather_body
}

#[inline(always)]
fn gather_body(dst: &mut [MaybeUninit<f32>], src: &[f32], offsets: &Offsets) {
    assert!(offsets.end <= src.len() && dst.len() == offsets.at.len());
    for (d, &o) in dst.iter_mut().zip(&offsets.at) {
        // SAFETY: every offset is below `end`, which src holds (asserted above).
        d.write(unsafe { *src.get_unchecked(o as usize) });
    }
}

/// cols[(c, i, j), (n, y, x)] = x_pad[n, c, y·s + i, x·s + j] for the window's images (x holds
/// them, `[n, C, H, W]`; the window not empty): each row a gather from the padded planes,
/// written into a new buffer without a zero fill first.
fn im2col(x: &[f32], w: Window) -> Vec<f32> {
    let (d, [kh, kw]) = (w.image, w.kernel);
    let [hp, wp] = w.padded_sides();
    let (xp, offsets) = (padded(x, w), w.offsets());
    let (columns, positions) = (w.columns(), w.positions());
    let window_rows = |cols: &mut [MaybeUninit<f32>]| {
        for (r, row) in cols.chunks_exact_mut(columns).enumerate() {
            let (c, i, j) = (r / (kh * kw), r / kw % kh, r % kw);
            for (n, dst) in row.chunks_exact_mut(positions).enumerate() {
                let plane = &xp[(n * d.c + c) * hp * wp..][..hp * wp];
                gather(dst, &plane[i * wp + j..], &offsets);
            }
        }
    };
    // SAFETY: the rows cover all depth·columns values (columns = n·positions each) and
    // `gather` wrote every value of each image's run (its dst is exactly the offsets' length).
    unsafe { written_in_full(w.depth() * columns, window_rows) }
}

/// The adjoint of [`im2col`]: x[n, c, y·s + i − p, x·s + j − p] += cols[(c, i, j), (n, y, x)]
/// into `x` (the window's images, `[n, C, H, W]`), each plane summing its taps in order in a
/// padded plane, then cropped.
fn col2im(cols: &[f32], w: Window, x: &mut [f32]) {
    let (d, [kh, kw], [ph, pw]) = (w.image, w.kernel, w.padding);
    let [hp, wp] = w.padded_sides();
    let (columns, positions, offsets) = (w.columns(), w.positions(), w.offsets());
    let mut padded = vec![0.0f32; hp * wp];
    for (plane_index, plane) in x.chunks_exact_mut(d.h * d.w).enumerate() {
        let (n, c) = (plane_index / d.c, plane_index % d.c);
        padded.fill(0.0);
        for i in 0..kh {
            for j in 0..kw {
                let row = &cols[((c * kh + i) * kw + j) * columns + n * positions..][..positions];
                let to = &mut padded[i * wp + j..];
                assert!(offsets.end <= to.len());
                for (&o, v) in offsets.at.iter().zip(row) {
                    // SAFETY: every offset is below `end`, which `to` holds (asserted above).
                    unsafe { *to.get_unchecked_mut(o as usize) += v };
                }
            }
        }
        for (dst, src) in plane
            .chunks_exact_mut(d.w)
            .zip(padded[ph * wp..].chunks_exact(wp))
        {
            dst.iter_mut().zip(&src[pw..]).for_each(|(o, v)| *o += v);
        }
    }
}

/// `[n, F, P]` → `[F, n·P]`: an output (or its gradient) as one row per filter (the CNN
/// module's `batch_to_rows`, positions as one row of P).
fn to_rows(y: &[f32], filters: usize, positions: usize) -> Vec<f32> {
    let n = y.len() / (filters * positions).max(1);
    let d = Dims {
        n,
        c: filters,
        h: 1,
        w: positions,
    };
    batch_to_rows(y, d)
}

/// Runs `f(images, out)` for each chunk of the window's images in parallel, `out` being the
/// chunk's share of `out` (`per_image` values an image; empty when `out` is), and sums the
/// weight-gradient parts `f` returns in chunk order.
fn chunked<F>(w: Window, out: &mut [f32], per_image: usize, f: F) -> Option<Vec<f32>>
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) -> Option<Vec<f32>> + Sync + Send,
{
    let (n, chunk) = (w.image.n, w.chunk());
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    let outs: Vec<&mut [f32]> = if out.is_empty() {
        starts.iter().map(|_| Default::default()).collect()
    } else {
        out.chunks_mut(chunk * per_image).collect()
    };
    let parts: Vec<Option<Vec<f32>>> = starts
        .into_par_iter()
        .zip(outs)
        .map(|(start, out)| f(start..(start + chunk).min(n), out))
        .collect();
    let mut parts = parts.into_iter().flatten();
    let mut total = parts.next()?;
    for part in parts {
        total.iter_mut().zip(&part).for_each(|(t, v)| *t += v);
    }
    Some(total)
}

/// One chunk's W · cols as `[n, F, P]` into `out`, plus b_f when given: `weight` is
/// `[F, C·k²]`, cols the chunk's im2col.
fn correlate_chunk(
    cols: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    wc: Window,
    out: &mut [f32],
) {
    let (depth, columns, positions) = (wc.depth(), wc.columns(), wc.positions());
    let filters = out.len() / (wc.image.n * positions);
    let (a, b) = (rows(weight, depth), rows(cols, columns));
    let y = new_product(filters, columns, depth, a, b, false);
    // [F, n·P] → [n, F, P], plus b_f.
    for (plane_index, plane) in out.chunks_exact_mut(positions).enumerate() {
        let (image, f) = (plane_index / filters, plane_index % filters);
        let src = &y[f * columns + image * positions..][..positions];
        let b = bias.map_or(0.0, |b| b[f]);
        plane.iter_mut().zip(src).for_each(|(o, v)| *o = v + b);
    }
}

/// One chunk's col2im(Wᵀ · Y) into `out` (the chunk's images): `y_rows` is `[F, n·P]`.
fn scatter_chunk(y_rows: &[f32], weight: &[f32], filters: usize, wc: Window, out: &mut [f32]) {
    let (depth, columns) = (wc.depth(), wc.columns());
    let (a, b) = (transposed(weight, depth), rows(y_rows, columns));
    let cols = new_product(depth, columns, filters, a, b, false);
    col2im(&cols, wc, out);
}

/// One chunk's share of ∂L/∂W = Y · colsᵀ, `[F, C·k²]`, from Y's rows `[F, n·P]`.
fn weight_chunk(y_rows: &[f32], cols: &[f32], filters: usize, wc: Window) -> Vec<f32> {
    let (depth, columns) = (wc.depth(), wc.columns());
    let (a, b) = (rows(y_rows, columns), transposed(cols, columns));
    new_product(filters, depth, columns, a, b, false)
}

/// Y = W · cols(x) + b as `[N, F, H', W']`: a convolution's forward pass (x the window's
/// images, `weight` `[F, C·k²]`).
fn correlate(x: &[f32], weight: &[f32], bias: &[f32], w: Window) -> Vec<f32> {
    let per_image = bias.len() * w.positions();
    let mut out = vec![0.0f32; w.image.n * per_image];
    if !w.is_empty() && per_image > 0 {
        chunked(w, &mut out, per_image, |images, out| {
            let wc = w.with_images(images.len());
            let cols = im2col(&x[images.start * w.image_len()..], wc);
            correlate_chunk(&cols, weight, Some(bias), wc, out);
            None
        });
    }
    out
}

/// col2im(Wᵀ · Y) as the window's images `[N, C, H, W]`: a transposed convolution's forward
/// pass (`y` `[N, F, H', W']`, `weight` `[F, C·k²]`).
fn scatter(y: &[f32], weight: &[f32], filters: usize, w: Window) -> Vec<f32> {
    let mut x = vec![0.0f32; w.image.n * w.image_len()];
    let per_image = filters * w.positions();
    if !w.is_empty() && per_image > 0 {
        chunked(w, &mut x, w.image_len(), |images, x| {
            let wc = w.with_images(images.len());
            let y_rows = to_rows(
                &y[images.start * per_image..][..images.len() * per_image],
                filters,
                w.positions(),
            );
            scatter_chunk(&y_rows, weight, filters, wc, x);
            None
        });
    }
    x
}

/// A convolution's ∂L/∂x = col2im(Wᵀ · G) and ∂L/∂W = G · cols(x)ᵀ (those `wanted`), one
/// pass over the chunks: each chunk's G as rows serves both products.
fn conv_backward(
    x: &[f32],
    weight: &[f32],
    g: &[f32],
    filters: usize,
    w: Window,
    wanted: [bool; 2],
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (image_len, per_image) = (w.image_len(), filters * w.positions());
    let mut dx = vec![0.0f32; if wanted[0] { w.image.n * image_len } else { 0 }];
    if w.is_empty() || per_image == 0 {
        return (
            wanted[0].then_some(dx),
            wanted[1].then(|| vec![0.0; filters * w.depth()]),
        );
    }
    let dw = chunked(w, &mut dx, image_len, |images, dx| {
        let wc = w.with_images(images.len());
        let g = &g[images.start * per_image..][..images.len() * per_image];
        let g_rows = to_rows(g, filters, w.positions());
        if !dx.is_empty() {
            scatter_chunk(&g_rows, weight, filters, wc, dx);
        }
        wanted[1].then(|| {
            let cols = im2col(&x[images.start * image_len..], wc);
            weight_chunk(&g_rows, &cols, filters, wc)
        })
    });
    (wanted[0].then_some(dx), dw)
}

/// A transposed convolution's ∂L/∂x = W · cols(G) and ∂L/∂W = X · cols(G)ᵀ (those `wanted`;
/// G = ∂L/∂out is the window's images, x `[N, F, H', W']`), one pass over the chunks: each
/// chunk's im2col of G serves both products.
fn conv_transpose_backward(
    x: &[f32],
    weight: &[f32],
    g: &[f32],
    filters: usize,
    w: Window,
    wanted: [bool; 2],
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let per_image = filters * w.positions();
    let mut dx = vec![0.0f32; if wanted[0] { w.image.n * per_image } else { 0 }];
    if w.is_empty() || per_image == 0 {
        return (
            wanted[0].then_some(dx),
            wanted[1].then(|| vec![0.0; filters * w.depth()]),
        );
    }
    let dw = chunked(w, &mut dx, per_image, |images, dx| {
        let wc = w.with_images(images.len());
        let cols = im2col(&g[images.start * w.image_len()..], wc);
        if !dx.is_empty() {
            correlate_chunk(&cols, weight, None, wc, dx);
        }
        wanted[1].then(|| {
            let x = &x[images.start * per_image..][..images.len() * per_image];
            weight_chunk(&to_rows(x, filters, w.positions()), &cols, filters, wc)
        })
    });
    (wanted[0].then_some(dx), dw)
}

/// Σ_{n,p} Y[n, c, p] for each channel of `[N, C, P]` (planes in f32, the batch in f64).
fn channel_sums(y: &[f32], channels: usize, positions: usize) -> Vec<f32> {
    let n = y.len().checked_div(channels * positions).unwrap_or(0);
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let planes = (0..n).map(|i| sum(&y[(i * channels + c) * positions..][..positions]));
            planes.map(f64::from).sum::<f64>() as f32
        })
        .collect()
}

/// The window of a convolution of x by a `[F, C, k_h, k_w]` weight.
fn conv_window(
    x: [usize; 4],
    weight: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Window {
    let [n, c, h, w] = x;
    let kernel = [weight[2], weight[3]];
    Window {
        image: Dims { n, c, h, w },
        kernel,
        stride,
        padding,
        out: [
            conv_side(h, kernel[0], stride[0], padding[0]),
            conv_side(w, kernel[1], stride[1], padding[1]),
        ],
    }
}

/// The window of the convolution a transposed convolution is the adjoint of: from its output
/// (`[N, C_out, size]`, the window's image) back to its input x (the window's positions).
fn transposed_window(
    x: [usize; 4],
    weight: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    size: [usize; 2],
) -> Window {
    let [n, _, h, w] = x;
    Window {
        image: Dims {
            n,
            c: weight[1],
            h: size[0],
            w: size[1],
        },
        kernel: [weight[2], weight[3]],
        stride,
        padding,
        out: [h, w],
    }
}

/// A convolution's ∂L/∂x = col2im(Wᵀ · G) alone, in x's shape (the CNN's stride-1
/// convolution, whose weight gradient [`crate::conv`] computes its own way).
pub(crate) fn conv_input_grad(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
) -> FlexTensor {
    let (xs, shape) = (dims4(x), dims4(weight));
    let w = conv_window(xs, shape, stride, padding);
    let (weight, grad) = (contiguous(weight), contiguous(grad));
    let (dx, _) = conv_backward(&[], f32s(&weight), f32s(&grad), shape[0], w, [true, false]);
    tensor(dx.unwrap_or_default(), xs.to_vec())
}

pub(crate) fn conv_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
) -> FlexTensor {
    let shape = dims4(weight);
    let w = conv_window(dims4(x), shape, stride, padding);
    let (x, weight, bias) = (contiguous(x), contiguous(weight), contiguous(bias));
    let y = correlate(f32s(&x), f32s(&weight), f32s(&bias), w);
    tensor(y, vec![w.image.n, shape[0], w.out[0], w.out[1]])
}

fn conv_transpose_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
    size: [usize; 2],
) -> FlexTensor {
    let shape = dims4(weight);
    let w = transposed_window(dims4(x), shape, stride, padding, size);
    let (x, weight, bias) = (contiguous(x), contiguous(weight), contiguous(bias));
    let mut out = scatter(f32s(&x), f32s(&weight), shape[0], w);
    let plane = size[0] * size[1];
    out.par_chunks_mut(plane).enumerate().for_each(|(p, o)| {
        let b = f32s(&bias)[p % w.image.c];
        o.iter_mut().for_each(|v| *v += b);
    });
    tensor(out, vec![w.image.n, w.image.c, size[0], size[1]])
}

impl StridedOps for Flex {
    fn conv2d_strided(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        Layer::Conv.forward([&x, &weight, &bias], stride, padding)
    }

    fn conv_transpose2d_strided(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        size: [usize; 2],
    ) -> FlexTensor {
        Layer::Transposed(size).forward([&x, &weight, &bias], stride, padding)
    }
}

/// The gradients a backward pass was asked for: ∂L/∂x, ∂L/∂W, ∂L/∂b.
struct Grads {
    x: Option<Vec<f32>>,
    weight: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
}

impl<C: CheckpointStrategy> StridedOps for Autodiff<Flex, C> {
    fn conv2d_strided(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        with_backward::<C>([x, weight, bias], stride, padding, Layer::Conv)
    }

    fn conv_transpose2d_strided(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        size: [usize; 2],
    ) -> FloatTensor<Self> {
        with_backward::<C>([x, weight, bias], stride, padding, Layer::Transposed(size))
    }
}

/// Which of the two layers an operation is: a convolution, or a transposed convolution to an
/// output of `size`.
#[derive(Debug, Clone, Copy)]
enum Layer {
    Conv,
    Transposed([usize; 2]),
}

impl Layer {
    /// out = correlate(x) + b, or scatter(x) + b.
    fn forward(
        self,
        [x, weight, bias]: [&FlexTensor; 3],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        match self {
            Layer::Conv => conv_forward(x, weight, bias, stride, padding),
            Layer::Transposed(size) => {
                conv_transpose_forward(x, weight, bias, stride, padding, size)
            }
        }
    }

    /// The gradients `wanted` of [x, W, b], given ∂L/∂out (the module docs' products).
    fn grads(
        self,
        [x, weight, grad]: [&FlexTensor; 3],
        stride: [usize; 2],
        padding: [usize; 2],
        wanted: [bool; 3],
    ) -> Grads {
        let (xs, shape) = (dims4(x), dims4(weight));
        let (x, weight, grad) = (contiguous(x), contiguous(weight), contiguous(grad));
        let (x, weight, g) = (f32s(&x), f32s(&weight), f32s(&grad));
        let filters = shape[0];
        let ([dx, dw], w) = match self {
            Layer::Conv => {
                let w = conv_window(xs, shape, stride, padding);
                let (dx, dw) = conv_backward(x, weight, g, filters, w, [wanted[0], wanted[1]]);
                ([dx, dw], w)
            }
            // The convolution this layer is the adjoint of runs from ∂L/∂out (its image) to
            // x's shape (its positions), with x's channels as its filters.
            Layer::Transposed(size) => {
                let w = transposed_window(xs, shape, stride, padding, size);
                let both = [wanted[0], wanted[1]];
                let (dx, dw) = conv_transpose_backward(x, weight, g, filters, w, both);
                ([dx, dw], w)
            }
        };
        // b is added to the output's channels: the filters of a convolution, the window's
        // image channels of a transposed one.
        let (channels, positions) = match self {
            Layer::Conv => (filters, w.positions()),
            Layer::Transposed(_) => (w.image.c, w.image.h * w.image.w),
        };
        Grads {
            x: dx,
            weight: dw,
            bias: wanted[2].then(|| channel_sums(g, channels, positions)),
        }
    }
}

/// The autodiff side of either layer: x and W kept for the backward pass.
fn with_backward<C: CheckpointStrategy>(
    [x, weight, bias]: [FloatTensor<Autodiff<Flex, C>>; 3],
    stride: [usize; 2],
    padding: [usize; 2],
    layer: Layer,
) -> FloatTensor<Autodiff<Flex, C>> {
    #[derive(Debug)]
    struct StridedBackward;

    impl Backward<Flex, 3> for StridedBackward {
        // x, W, stride, padding, the layer
        type State = (FlexTensor, FlexTensor, [usize; 2], [usize; 2], Layer);

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight, node_bias] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, weight, stride, padding, layer) = ops.state;
            let wanted = [node_x.is_some(), node_weight.is_some(), node_bias.is_some()];
            let g = layer.grads([&x, &weight, &grad], stride, padding, wanted);
            let shapes = [dims4(&x), dims4(&weight)];
            let nodes = [node_x, node_weight, node_bias].map(|n| n.map(|n| n.id));
            register(grads, nodes, g, shapes);
        }
    }

    let nodes = [x.node(), weight.node(), bias.node()];
    let (x, weight, bias) = (
        x.into_primitive(),
        weight.into_primitive(),
        bias.into_primitive(),
    );
    let out = layer.forward([&x, &weight, &bias], stride, padding);
    match StridedBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x, weight, stride, padding, layer), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Registers the gradients asked for: x's and W's in their shapes, b's as a vector.
fn register(
    grads: &mut Gradients,
    nodes: [Option<NodeId>; 3],
    g: Grads,
    [x_shape, weight_shape]: [[usize; 4]; 2],
) {
    let [node_x, node_weight, node_bias] = nodes;
    if let (Some(node), Some(dx)) = (node_x, g.x) {
        grads.register::<Flex>(node, tensor(dx, x_shape.to_vec()));
    }
    if let (Some(node), Some(dw)) = (node_weight, g.weight) {
        grads.register::<Flex>(node, tensor(dw, weight_shape.to_vec()));
    }
    if let (Some(node), Some(db)) = (node_bias, g.bias) {
        let len = db.len();
        grads.register::<Flex>(node, tensor(db, vec![len]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{close, to_vec};
    use burn::module::Param;
    use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use burn::tensor::{Device, Distribution};

    /// Values and gradients (x, W, b) of `ours` and Burn's `theirs` for the same input and
    /// a loss with a different weight on every output.
    fn same_as_burn<M: Clone>(
        layer: &M,
        params: impl Fn(&M) -> (Param<Tensor<4>>, Option<Param<Tensor<1>>>),
        ours: impl Fn(&M, Tensor<4>) -> Tensor<4>,
        theirs: impl Fn(&M, Tensor<4>) -> Tensor<4>,
        x_shape: [usize; 4],
        what: &str,
        d: &Device,
    ) {
        let x = Tensor::<4>::random(x_shape, Distribution::Normal(0.0, 1.0), d).require_grad();
        let x2 = x.clone().detach().require_grad();
        let (a, b) = (layer.clone(), layer.clone());
        let y1 = ours(&a, x.clone());
        let y2 = theirs(&b, x2.clone());
        assert_eq!(y1.dims(), y2.dims(), "{what}: shape");
        close(&to_vec(y1.clone()), &to_vec(y2.clone()), 1e-5, what);
        let r = Tensor::<4>::random(y2.dims(), Distribution::Normal(0.0, 1.0), d);
        let g1 = (y1 * r.clone()).sum().backward();
        let g2 = (y2 * r).sum().backward();
        let grad = |t: &Tensor<4>, g| to_vec(t.grad(g).unwrap());
        close(&grad(&x, &g1), &grad(&x2, &g2), 1e-4, &format!("∂x {what}"));
        let ((w1, b1), (w2, b2)) = (params(&a), params(&b));
        let gw = |p: &Param<Tensor<4>>, g| to_vec(p.grad(g).unwrap());
        close(&gw(&w1, &g1), &gw(&w2, &g2), 1e-4, &format!("∂W {what}"));
        if let (Some(b1), Some(b2)) = (b1, b2) {
            let gb = |p: &Param<Tensor<1>>, g| to_vec(p.grad(g).unwrap());
            close(&gb(&b1, &g1), &gb(&b2, &g2), 1e-4, &format!("∂b {what}"));
        }
    }

    /// Strides 1–3, padding 0–2, odd and even kernels, sides the window does not divide, a
    /// rectangular kernel and stride, and a layer without bias.
    #[test]
    fn strided_convolution_matches_burn() {
        let d = Device::flex().autodiff();
        d.seed(31);
        let cases = [
            // (channels [in, out], kernel, stride, padding, x [n, c, h, w], bias)
            ([1, 8], [4, 4], [2, 2], [1, 1], [3, 1, 28, 28], true),
            ([8, 16], [4, 4], [2, 2], [1, 1], [2, 8, 14, 14], true),
            ([3, 5], [3, 3], [2, 2], [0, 0], [2, 3, 7, 8], true),
            ([3, 4], [3, 3], [1, 1], [1, 1], [2, 3, 5, 6], false),
            ([2, 3], [5, 3], [3, 2], [2, 1], [2, 2, 11, 9], true),
            ([4, 2], [1, 1], [2, 2], [0, 0], [1, 4, 5, 5], true),
        ];
        for (channels, kernel, stride, [ph, pw], shape, bias) in cases {
            let conv = Conv2dConfig::new(channels, kernel)
                .with_stride(stride)
                .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
                .with_bias(bias)
                .init(&d);
            let what = format!(
                "conv {channels:?} k{kernel:?} s{stride:?} p{:?} x{shape:?}",
                [ph, pw]
            );
            same_as_burn(
                &conv,
                |c| (c.weight.clone(), c.bias.clone()),
                conv2d,
                |c, x| c.forward(x),
                shape,
                &what,
                &d,
            );
        }
    }

    /// The DCGAN generator's 4×4 stride-2 layers, an odd kernel with `padding_out`, a
    /// rectangular stride, stride 1, and a layer without bias.
    #[test]
    fn strided_transposed_convolution_matches_burn() {
        let d = Device::flex().autodiff();
        d.seed(37);
        let cases = [
            // (channels [in, out], kernel, stride, padding, padding_out, x, bias)
            ([16, 8], [4, 4], [2, 2], [1, 1], [0, 0], [2, 16, 7, 7], true),
            ([8, 1], [4, 4], [2, 2], [1, 1], [0, 0], [3, 8, 14, 14], true),
            ([3, 5], [3, 3], [2, 2], [1, 1], [1, 1], [2, 3, 5, 4], true),
            ([3, 2], [3, 5], [1, 2], [0, 2], [0, 1], [2, 3, 4, 6], false),
            ([2, 3], [3, 3], [1, 1], [1, 1], [0, 0], [1, 2, 5, 5], true),
        ];
        for (channels, kernel, stride, padding, padding_out, shape, bias) in cases {
            let conv = ConvTranspose2dConfig::new(channels, kernel)
                .with_stride(stride)
                .with_padding(padding)
                .with_padding_out(padding_out)
                .with_bias(bias)
                .init(&d);
            let what = format!(
                "conv_transpose {channels:?} k{kernel:?} s{stride:?} p{padding:?} out+{padding_out:?} x{shape:?}"
            );
            same_as_burn(
                &conv,
                |c| (c.weight.clone(), c.bias.clone()),
                conv_transpose2d,
                |c, x| c.forward(x),
                shape,
                &what,
                &d,
            );
        }
    }

    /// col2im is im2col's adjoint: ⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩ for any x and c.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let w = Window {
            image: Dims {
                n: 2,
                c: 3,
                h: 9,
                w: 8,
            },
            kernel: [4, 3],
            stride: [2, 3],
            padding: [1, 2],
            out: [conv_side(9, 4, 2, 1), conv_side(8, 3, 3, 2)],
        };
        let wave = |len: usize, f: f32| (0..len).map(|i| (i as f32 * f).sin()).collect::<Vec<_>>();
        let x = wave(2 * 3 * 9 * 8, 0.37);
        let c = wave(w.depth() * w.columns(), 0.91);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p * q) as f64).sum::<f64>();
        let mut back = vec![0.0f32; x.len()];
        col2im(&c, w, &mut back);
        let (lhs, rhs) = (dot(&im2col(&x, w), &c), dot(&x, &back));
        assert!(
            (lhs - rhs).abs() < 1e-3 * (1.0 + lhs.abs()),
            "{lhs} vs {rhs}"
        );
    }

    /// Without autodiff the layers still run the kernels and give Burn's values.
    #[test]
    fn inference_matches_burn() {
        let d = Device::flex();
        d.seed(41);
        let conv = Conv2dConfig::new([2, 3], [4, 4])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&d);
        let deconv = ConvTranspose2dConfig::new([3, 2], [4, 4])
            .with_stride([2, 2])
            .with_padding([1, 1])
            .init(&d);
        let x = Tensor::<4>::random([2, 2, 8, 8], Distribution::Normal(0.0, 1.0), &d);
        let y = conv2d(&conv, x.clone());
        close(&to_vec(y.clone()), &to_vec(conv.forward(x)), 1e-5, "conv");
        let z = conv_transpose2d(&deconv, y.clone());
        close(
            &to_vec(z),
            &to_vec(deconv.forward(y)),
            1e-5,
            "conv_transpose",
        );
    }
}
