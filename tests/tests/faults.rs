//! Faults: runs killed with SIGKILL at random moments (inside a batch, while a checkpoint is
//! being written, during validation or a judge's pass) and resumed each time end exactly as an
//! uninterrupted run: metrics.csv to the byte, and the final weights' values by their digest
//! `model.sha256` (Burn writes random parameter ids into `model.bpk`). A checkpoint write that
//! fails (a file-size limit) stops the run with one line and leaves the checkpoint before it
//! loadable.

mod common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// A small xorshift generator: the kill moments, reproducible from `KILN_FAULT_SEED` (printed).
struct Moments(u64);

impl Moments {
    fn new() -> Self {
        let seed = std::env::var("KILN_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("kill moments from KILN_FAULT_SEED={seed}");
        Moments(seed | 1)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The unit `checkpoints/latest` names, if any.
fn latest(run: &Path) -> Option<String> {
    fs::read_to_string(run.join("checkpoints").join("latest")).ok()
}

/// `kiln <args>` started; once it has committed a checkpoint newer than the one the run had,
/// killed with SIGKILL `after` later (a random moment of the next unit: a batch, validation, a
/// checkpoint being written). Returns the kill's delay, or `None` if the run ended first.
fn kill_within_next_unit(args: &[&str], run: &Path, after: Duration) -> Option<f64> {
    let before = latest(run);
    let mut child = kiln()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while latest(run) == before {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "kiln {args:?} failed on its own");
            return None;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    let committed = Instant::now();
    while committed.elapsed() < after {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "kiln {args:?} failed on its own");
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    let _ = child.wait();
    Some(after.as_secs_f64())
}

/// An uninterrupted run of `args` (`units` epochs or rounds) into `dir/straight`, then the same
/// run killed five times — the first kill during `train`, the others during `resume`, each at a
/// random moment of the unit after a fresh checkpoint — and resumed to the end: `metrics.csv`
/// and the final weights' values (`model.sha256`) are the same bytes.
fn five_kills_change_nothing(dir: &Path, args: &[&str], units: usize) {
    let straight = dir.join("straight");
    let started = Instant::now();
    run_ok(&[&["train"], args, &["--out", path_str(&straight)]].concat());
    let unit = started.elapsed().as_secs_f64() / units as f64;

    let killed = dir.join("killed");
    let out = path_str(&killed);
    let mut moments = Moments::new();
    let mut kills = Vec::new();
    let train = [&["train"], args, &["--out", out]].concat();
    let resume = ["resume", out];
    // Each attempt gains at most about two units, so five kills stay inside the run.
    while kills.len() < 5 {
        let cmd: &[&str] = if kills.is_empty() { &train } else { &resume };
        let after = Duration::from_secs_f64(moments.between(0.0, unit));
        match kill_within_next_unit(cmd, &killed, after) {
            Some(k) => kills.push(k),
            None => break,
        }
    }
    assert_eq!(
        kills.len(),
        5,
        "the run ended after kills at {kills:?} s into a unit"
    );
    run_ok(&["resume", out]);
    for f in ["metrics.csv", "model.sha256"] {
        assert!(
            fs::read(straight.join(f)).unwrap() == fs::read(killed.join(f)).unwrap(),
            "{f} differs after kills at {kills:?} s into a unit of {unit:.2} s"
        );
    }
}

#[test]
fn cnn_killed_five_times_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [&DIGITS_CNN[..], &["--set", "train.epochs=16"]].concat();
    five_kills_change_nothing(tmp.path(), &args, 16);
}

#[test]
fn gan_killed_five_times_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["gan", "--set", "train.epochs=16"];
    args.extend(DIGITS_MLP_GAN);
    five_kills_change_nothing(tmp.path(), &args, 16);
}

#[test]
fn dqn_killed_five_times_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    five_kills_change_nothing(
        tmp.path(),
        &[
            "dqn-cartpole",
            "--set",
            "train.epochs=16",
            "--set",
            "params.episodes_per_round=5",
            "--set",
            "params.warmup=200",
            "--set",
            "params.eval_episodes=3",
        ],
        16,
    );
}

/// A file-size limit smaller than the model's checkpoint: the resumed run stops at its next
/// checkpoint with one error line, the checkpoint before it still loads, and once the limit
/// is lifted the run ends as if nothing had happened.
#[test]
fn failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        &DIGITS_CNN[..],
        &["--set", "params.net.dense=[512]", "--set", "train.epochs=3"],
    ]
    .concat();
    let straight = tmp.path().join("straight");
    run_ok(&[&["train"][..], &args, &["--out", path_str(&straight)]].concat());
    assert!(
        fs::metadata(straight.join("model.bpk")).unwrap().len() > 300 * 1024,
        "the model must be larger than the limit below"
    );

    let b = tmp.path().join("b");
    killed_after(&b, &args, 1);
    let before = fs::read_to_string(b.join("checkpoints/latest")).unwrap();
    // bash's `ulimit -f` counts KiB.
    let limited = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 256 && exec {} resume {}",
            kiln_path().display(),
            b.display()
        ))
        .current_dir(root())
        .output()
        .unwrap();
    assert_clean_error(&Run::from_output(limited), "cannot save");
    assert_eq!(
        fs::read_to_string(b.join("checkpoints/latest")).unwrap(),
        before
    );
    run_ok(&["resume", path_str(&b)]);
    for f in ["metrics.csv", "model.sha256"] {
        assert!(
            fs::read(straight.join(f)).unwrap() == fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

/// `kiln train` killed with SIGKILL once the checkpoint of unit `units` is the latest.
fn killed_after(out: &Path, args: &[&str], units: usize) {
    let mut child = kiln()
        .arg("train")
        .args(args)
        .args(["--out", path_str(out)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = out.join("checkpoints").join("latest");
    let want = format!("epoch-{units:04}");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if fs::read_to_string(&latest).is_ok_and(|l| l.trim() == want) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(!out.join("summary.json").exists(), "the run finished first");
}
