//! Where the default CNN's time goes: forward + backward of each layer alone, for one batch
//! of 128 Fashion-MNIST-sized inputs, on the backend given (default flex).
//!
//! `cargo run --release -p kiln-cnn --example layer_times [-- flex|ndarray [ROW FILTER]]`

use std::time::Instant;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use kiln_cnn::conv2d_im2col;
use kiln_cnn::flex_ops::{block_tail, block_tail_reference, conv2d, conv2d_constant_input};
use kiln_core::BackendName;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 128;
const REPS: usize = 10;

/// Mean milliseconds of `step` over REPS runs after one warm-up run (only the rows whose
/// name contains the second argument, when one is given).
fn time(name: &str, mut step: impl FnMut()) {
    if let Some(filter) = std::env::args().nth(2)
        && !name.contains(&filter)
    {
        return;
    }
    step();
    let started = Instant::now();
    for _ in 0..REPS {
        step();
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0 / REPS as f64;
    let epoch = ms * 60_000.0 / BATCH as f64 / 1000.0;
    println!("| {name} | {ms:.1} | {epoch:.1} |");
}

fn input(shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn conv(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .init(device)
}

fn main() -> Result<(), String> {
    let backend = BackendName::parse(&std::env::args().nth(1).unwrap_or("flex".into()))?;
    let device = backend.device()?.autodiff();
    device.seed(1);
    let images = input([BATCH, 1, 28, 28], &device);
    let maps1 = input([BATCH, 32, 28, 28], &device).require_grad();
    let pooled1 = input([BATCH, 32, 14, 14], &device).require_grad();
    let maps2 = input([BATCH, 64, 14, 14], &device).require_grad();
    let flat =
        Tensor::<2>::random([BATCH, 3136], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let (conv1, conv2) = (conv(1, 32, &device), conv(32, 64, &device));
    let (bn1, bn2) = (
        BatchNormConfig::new(32).init(&device),
        BatchNormConfig::new(64).init(&device),
    );
    let pool = MaxPool2dConfig::new([2, 2]).init();
    let fc = LinearConfig::new(3136, 128).init(&device);

    println!("{backend}, batch {BATCH}, forward + backward of one layer\n");
    println!("| layer | ms a batch | s an epoch (60k) |\n|---|---|---|");
    time("conv 1→32 3×3 same, Burn's conv2d", || {
        let _ = conv1.forward(images.clone()).sum().backward();
    });
    time("conv 1→32 3×3 same, im2col product (kiln)", || {
        let _ = conv2d_im2col(&conv1, images.clone()).sum().backward();
    });
    time("conv 1→32 3×3 same, kiln's weight gradient", || {
        let _ = conv2d(&conv1, images.clone()).sum().backward();
    });
    time(
        "conv 1→32 3×3 same, kiln's first-layer loops (used on flex)",
        || {
            let _ = conv2d_constant_input(&conv1, images.clone())
                .sum()
                .backward();
        },
    );
    time("batch norm [128, 32, 28, 28]", || {
        let _ = bn1.forward(maps1.clone()).sum().backward();
    });
    time("2×2 max-pool then ReLU [128, 32, 28, 28]", || {
        let _ = relu(pool.forward(maps1.clone())).sum().backward();
    });
    time(
        "batch norm → pool → ReLU [128, 32, 28, 28], Burn's ops",
        || {
            let _ = block_tail_reference(Some(&bn1), &pool, maps1.clone())
                .sum()
                .backward();
        },
    );
    time("the same fused (kiln, now used)", || {
        let _ = block_tail(Some(&bn1), &pool, maps1.clone())
            .sum()
            .backward();
    });
    time("pool → ReLU fused, no batch norm", || {
        let _ = block_tail(None, &pool, maps1.clone()).sum().backward();
    });
    time("conv 32→64 3×3 same [128, 32, 14, 14]", || {
        let _ = conv2.forward(pooled1.clone()).sum().backward();
    });
    time(
        "batch norm → pool → ReLU [128, 64, 14, 14], Burn's ops",
        || {
            let _ = block_tail_reference(Some(&bn2), &pool, maps2.clone())
                .sum()
                .backward();
        },
    );
    time("the same fused (kiln, now used)", || {
        let _ = block_tail(Some(&bn2), &pool, maps2.clone())
            .sum()
            .backward();
    });
    time("the same, kiln's weight gradient (used on flex)", || {
        let _ = conv2d(&conv2, pooled1.clone()).sum().backward();
    });
    // (Burn's detach keeps require_grad: a fresh tensor is needed for no ∂L/∂x.)
    let pooled1_const = input([BATCH, 32, 14, 14], &device);
    time("  conv2 forward + Burn's weight gradient only", || {
        let _ = conv2.forward(pooled1_const.clone()).sum().backward();
    });
    time("  conv2 forward + kiln's weight gradient only", || {
        let _ = conv2d(&conv2, pooled1_const.clone()).sum().backward();
    });
    let inner = pooled1.clone().inner();
    let conv2_inner = conv2.clone().valid();
    time("  conv2 forward only", || {
        let _: f32 = conv2_inner.forward(inner.clone()).sum().into_scalar();
    });
    time("dense 3136→128", || {
        let _ = fc.forward(flat.clone()).sum().backward();
    });
    Ok(())
}
