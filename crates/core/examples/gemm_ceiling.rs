//! How fast can a dense model train on this machine at best? When a model's arithmetic is
//! almost all matrix products, the ceiling is what the backend's matrix product delivers at
//! the model's own shapes. This prints GFLOP/s at the shapes of two models with speed targets
//! and the rate each target needs.
//!
//! A product [m×k]·[k×n] is 2·m·k·n FLOP (a multiply and an add per term). Training a layer
//! y = x·W costs its forward product plus two of the same size backward (∂L/∂x = ∂L/∂y·Wᵀ and
//! ∂L/∂W = xᵀ·∂L/∂y), so 3× the forward, 2× for a first layer (no ∂L/∂x needed).
//!
//! - `char-rnn` (embedding 64, 2×256 LSTM, vocabulary V ≈ 100), per character: layer 1
//!   [x, h]·W with W (64 + 256) × 4·256, layer 2 (256 + 256) × 4·256, the output 256 × V.
//! - `vae` (PyTorch examples/vae: 784-400-(20, 20)-400-784), per image: 784 × 400, twice
//!   400 × 20, 20 × 400, 400 × 784.
//!
//! `cargo run --release -p kiln-core --example gemm_ceiling [-- flex|ndarray|wgpu …]`

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use kiln_core::BackendName;

/// Training FLOP of one character of `char-rnn` (vocabulary 100).
fn char_rnn_flop() -> f64 {
    3.0 * 2.0 * (320.0 * 1024.0 + 512.0 * 1024.0 + 256.0 * 100.0)
}

/// Training FLOP of one image of `vae` (the first layer needs no input gradient).
fn vae_flop() -> f64 {
    2.0 * 2.0 * 784.0 * 400.0 + 3.0 * 2.0 * (2.0 * 400.0 * 20.0 + 20.0 * 400.0 + 400.0 * 784.0)
}

/// GFLOP/s of `[m, k] · [k, n]`: the median of 7 timed runs of enough products to take about
/// 0.2 s each, after a warm-up run.
fn rate(m: usize, k: usize, n: usize, device: &Device) -> f64 {
    let a = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), device);
    let flop = 2.0 * (m * k * n) as f64;
    let reps = ((0.2 * 50e9 / flop).ceil() as usize).max(1);
    let run = || {
        let started = Instant::now();
        for _ in 0..reps {
            // Reading one value back waits for the product on any backend.
            let _ = a
                .clone()
                .matmul(b.clone())
                .slice([0..1, 0..1])
                .into_scalar::<f32>();
        }
        started.elapsed().as_secs_f64()
    };
    run();
    let mut times: Vec<f64> = (0..7).map(|_| run()).collect();
    times.sort_by(f64::total_cmp);
    flop * reps as f64 / times[3] / 1e9
}

fn main() -> Result<(), String> {
    let backend = BackendName::parse(&std::env::args().nth(1).unwrap_or("flex".into()))?;
    let device = backend.device()?;
    device.seed(1);
    let (rnn, vae) = (char_rnn_flop(), vae_flop());
    println!(
        "char-rnn: {:.2} MFLOP per training character; 50,000 characters/s need {:.0} GFLOP/s",
        rnn / 1e6,
        50_000.0 * rnn / 1e9
    );
    println!(
        "vae: {:.2} MFLOP per training image; an epoch of 60,000 images in 2.3 s needs {:.0} GFLOP/s\n",
        vae / 1e6,
        60_000.0 * vae / 2.3 / 1e9
    );
    println!("| product [m×k]·[k×n] | GFLOP/s | at this rate throughout |");
    println!("|---|---|---|");
    let square = |n| ("square", n, n, n);
    for (what, m, k, n) in [
        ("char-rnn layer 1 step, batch 64", 64, 320, 1024),
        ("char-rnn layer 2 step, batch 64", 64, 512, 1024),
        ("char-rnn layer 2 input, 100 steps at once", 6400, 256, 1024),
        ("vae layer 1, batch 128", 128, 784, 400),
        ("vae ∂L/∂W of layer 1", 784, 128, 400),
        ("vae output layer, batch 128", 128, 400, 784),
        square(1024),
        square(2048),
    ] {
        let g = rate(m, k, n, &device);
        let allows = if what.starts_with("char-rnn") {
            format!("{:.0} characters/s", g * 1e9 / rnn)
        } else if what.starts_with("vae") {
            format!("{:.2} s an epoch", 60_000.0 * vae / (g * 1e9))
        } else {
            format!(
                "{:.0} characters/s; {:.2} s a VAE epoch",
                g * 1e9 / rnn,
                60_000.0 * vae / (g * 1e9)
            )
        };
        println!("| {what}: [{m}×{k}]·[{k}×{n}] | {g:.1} | {allows} |");
    }
    Ok(())
}
