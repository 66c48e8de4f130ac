//! Running the built `kiln` binary from the repository root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The repository root (configs/ and data/ are found relative to it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/<profile>/kiln`, next to this test executable's `deps/` directory.
pub fn kiln_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(format!("kiln{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build --workspace --all-targets` first (`just test` does)",
        bin.display()
    );
    bin
}

pub fn kiln() -> Command {
    let mut c = Command::new(kiln_path());
    c.current_dir(root());
    c
}

pub struct Run {
    pub out: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.out.status.success()
    }

    /// A finished process's output, its streams as text.
    pub fn from_output(out: Output) -> Run {
        Run {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            out,
        }
    }
}

pub fn run(args: &[&str]) -> Run {
    run_env(args, &[])
}

/// `run` with extra environment variables set for the child.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    Run::from_output(
        kiln()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run kiln"),
    )
}

/// Run and require success, showing stderr on failure.
pub fn run_ok(args: &[&str]) -> Run {
    let r = run(args);
    assert!(r.ok(), "kiln {args:?} failed:\n{}", r.stderr);
    r
}

/// The last stderr line must be one `error: ...` line naming `needle`, exit non-zero, no panic.
pub fn assert_clean_error(r: &Run, needle: &str) {
    assert!(!r.ok(), "expected failure, got success: {}", r.stdout);
    assert_eq!(
        r.out.status.code(),
        Some(1),
        "exit code; stderr: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("internal error"),
        "panic: {}",
        r.stderr
    );
    let last = r.stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: "),
        "not an error line: {:?}",
        r.stderr
    );
    assert!(
        last.contains(needle),
        "error {last:?} does not mention {needle:?}"
    );
}

pub fn summary(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `kiln train` with `args`, killed with SIGKILL once its first checkpoint exists, then
/// `kiln resume`d to the end.
pub fn killed_and_resumed(out: &Path, args: &[&str]) {
    let mut cmd = kiln();
    cmd.args(["train"])
        .args(args)
        .args(["--out", path_str(out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let latest = out.join("checkpoints").join("latest");
    let started = Instant::now();
    while !latest.exists() && started.elapsed() < Duration::from_secs(120) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SIGKILL: no chance to clean up, as after a crash or an OOM kill.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before it could be killed"
    );
    child.kill().unwrap();
    let _ = child.wait();
    assert!(latest.exists(), "no checkpoint was written before the kill");
    assert!(
        !out.join("summary.json").exists(),
        "the run finished before the kill"
    );
    run_ok(&["resume", path_str(out)]);
}

/// The rows of a run's `metrics.csv`, without the header.
pub fn metrics_rows(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .expect("metrics.csv")
        .lines()
        .skip(1)
        .map(String::from)
        .collect()
}

/// Every row's value of the `metrics.csv` column `name`.
pub fn metrics_column(dir: &Path, name: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name} in {header:?}"));
    lines
        .map(|l| {
            l.split(',')
                .nth(col)
                .expect("cell")
                .parse()
                .expect("number")
        })
        .collect()
}

/// The default `cnn` network on the 8×8 digits (same padding keeps the small maps): the
/// config and its `--set`s, without `train.epochs`.
pub const DIGITS_CNN: [&str; 5] = [
    "cnn",
    "--set",
    "dataset=digits",
    "--set",
    "params.net.padding=same",
];

/// A small VAE on the 8×8 digits: the config and its `--set`s, without `train.epochs`.
pub const DIGITS_VAE: [&str; 11] = [
    "vae",
    "--set",
    "dataset=digits",
    "--set",
    "params.net.hidden=[64]",
    "--set",
    "params.net.latent=2",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.learning_rate=0.003",
];

/// Two short rounds of DQN on CartPole: the config and its `--set`s.
pub const QUICK_DQN: [&str; 9] = [
    "dqn-cartpole",
    "--set",
    "train.epochs=2",
    "--set",
    "params.episodes_per_round=2",
    "--set",
    "params.warmup=32",
    "--set",
    "params.eval_episodes=1",
];

/// A small MLP GAN on the 8×8 digits: its `--set`s, without `train.epochs`.
pub const DIGITS_MLP_GAN: [&str; 10] = [
    "--set",
    "dataset=digits",
    "--set",
    "params.net.kind=mlp",
    "--set",
    "params.net.latent=16",
    "--set",
    "params.net.widths=[64,64]",
    "--set",
    "train.learning_rate=0.001",
];
