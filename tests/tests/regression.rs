//! End to end: linear and logistic regression through the `kiln` CLI on the real data.

mod common;

use std::fs;

use common::*;

#[test]
fn linear_gradient_descent_agrees_with_least_squares() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r2 = Vec::new();
    for name in ["linear-simple", "linear-multiple", "linear"] {
        let out = tmp.path().join(name);
        run_ok(&["train", name, "--out", path_str(&out)]);
        let s = summary(&out);
        let rel = s["max_relative_difference"].as_f64().unwrap();
        assert!(rel < 1e-3, "{name}: GD vs least squares differ by {rel}");
        for key in ["mse", "mae", "r2"] {
            assert!(
                s["test"][key].as_f64().unwrap().is_finite(),
                "{name}: test.{key}"
            );
        }
        for set in ["gradient_descent", "least_squares"] {
            for units in ["standardized", "original_units"] {
                assert!(
                    s[set][units]["intercept"].is_number(),
                    "{name}: {set}.{units}"
                );
            }
        }
        for f in [
            "config.toml",
            "metrics.csv",
            "loss.png",
            "model.bpk",
            "report.md",
            "checkpoints/latest",
        ] {
            assert!(out.join(f).is_file(), "{name}: missing {f}");
        }
        r2.push(s["test"]["r2"].as_f64().unwrap());
    }
    // More features explain more of the variance on this split.
    assert!(
        r2[0] > 0.3 && r2[0] < r2[1] && r2[1] < r2[2],
        "R² simple/multiple/all: {r2:?}"
    );
    assert!(r2[2] > 0.6, "R² with all features: {}", r2[2]);
}

#[test]
fn logistic_binary_is_perfect_and_multiclass_reaches_96_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    run_ok(&["train", "logistic", "--out", path_str(&bin)]);
    let s = summary(&bin);
    assert_eq!(s["kind"], "binary");
    assert_eq!(
        s["test"]["accuracy"].as_f64().unwrap(),
        1.0,
        "binary test accuracy"
    );
    assert!(bin.join("decision_boundary.png").is_file());
    assert!(bin.join("accuracy.png").is_file());

    let multi = tmp.path().join("multi");
    run_ok(&["train", "logistic-multiclass", "--out", path_str(&multi)]);
    let s = summary(&multi);
    assert_eq!(s["kind"], "multiclass");
    assert_eq!(s["test_examples"], 30);
    let acc = s["test"]["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.96, "3-class test accuracy {acc}");
}

#[test]
fn eval_and_predict_use_the_saved_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    run_ok(&[
        "train",
        "logistic",
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=30",
    ]);
    let s = summary(&out);

    let e = run_ok(&["eval", path_str(&out)]);
    let eval: serde_json::Value = serde_json::from_str(&e.stdout).unwrap();
    assert_eq!(eval["test"]["accuracy"], s["test"]["accuracy"]);

    // A typical setosa (short, wide sepal) and a typical versicolor (long, narrow).
    let p = run_ok(&["predict", path_str(&out), "--input", "5.0,3.5"]);
    assert!(p.stdout.starts_with("setosa"), "{}", p.stdout);
    let csv = tmp.path().join("flowers.csv");
    fs::write(&csv, "sepal_length,sepal_width\n5.0,3.5\n6.6,2.9\n").unwrap();
    let p = run_ok(&["predict", path_str(&out), "--input", path_str(&csv)]);
    let lines: Vec<&str> = p.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", p.stdout);
    assert!(
        lines[0].starts_with("setosa") && lines[1].starts_with("versicolor"),
        "{}",
        p.stdout
    );

    let lin = tmp.path().join("lin");
    run_ok(&[
        "train",
        "linear-simple",
        "--out",
        path_str(&lin),
        "--set",
        "train.epochs=200",
    ]);
    let small = run_ok(&["predict", path_str(&lin), "--input", "5"]);
    let big = run_ok(&["predict", path_str(&lin), "--input", "8"]);
    let value = |s: &str| s.trim().rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    assert!(
        value(&big.stdout) > value(&small.stdout) + 10.0,
        "more rooms, higher price: {} vs {}",
        small.stdout,
        big.stdout
    );
}

#[test]
fn same_seed_gives_identical_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let read = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        run_ok(&[
            "train",
            "logistic-multiclass",
            "--out",
            path_str(&out),
            "--seed",
            seed,
            "--set",
            "train.epochs=15",
        ]);
        fs::read_to_string(out.join("metrics.csv")).unwrap()
    };
    let a = read("a", "7");
    let b = read("b", "7");
    let c = read("c", "8");
    assert_eq!(a.lines().count(), 16);
    assert_eq!(a, b, "same seed, different metrics");
    assert_ne!(a, c, "different seeds should differ");
}

#[test]
fn resume_after_kill_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "train",
            "logistic-multiclass",
            "--out",
            out,
            "--set",
            "train.epochs=300",
            "--set",
            "train.batch_size=4",
        ]
        .map(String::from)
        .to_vec()
    };
    let full = tmp.path().join("full");
    let full_s = path_str(&full).to_string();
    run_ok(&args(&full_s).iter().map(String::as_str).collect::<Vec<_>>());

    let killed = tmp.path().join("killed");
    let killed_s = path_str(&killed).to_string();
    let mut child = kiln()
        .args(args(&killed_s))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints, then kill -9 in the middle of training.
    let latest = killed.join("checkpoints/latest");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let epoch = fs::read_to_string(&latest)
            .ok()
            .and_then(|s| s.trim().trim_start_matches("epoch-").parse::<usize>().ok())
            .unwrap_or(0);
        if epoch >= 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("summary.json").exists(),
        "run finished before it could be killed"
    );

    run_ok(&["resume", &killed_s]);
    let a = fs::read_to_string(full.join("metrics.csv")).unwrap();
    let b = fs::read_to_string(killed.join("metrics.csv")).unwrap();
    assert_eq!(a.lines().count(), 301);
    assert_eq!(
        a, b,
        "resumed run's metrics differ from the uninterrupted run"
    );
    assert_eq!(summary(&full)["test"], summary(&killed)["test"]);
}

#[test]
fn divergence_stops_with_a_message_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    let r = run(&[
        "train",
        "linear",
        "--out",
        path_str(&out),
        "--set",
        "train.learning_rate=1e6",
        "--set",
        "train.optimizer.momentum=0",
    ]);
    assert_clean_error(&r, "diverged");
    assert!(
        r.stderr.contains("kept the checkpoint of epoch"),
        "{}",
        r.stderr
    );
    let latest = fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert!(
        out.join("checkpoints")
            .join(latest.trim())
            .join("model.bpk")
            .is_file()
    );
    assert!(out.join("metrics.csv").is_file());
    // The run says it failed and how to continue it; `kiln list --runs` shows it.
    let s = summary(&out);
    assert_eq!(s["status"], "failed");
    assert!(s["error"].as_str().unwrap().contains("diverged"), "{s}");
    assert_eq!(
        s["resume"],
        format!("kiln resume {}", path_str(&out)).as_str()
    );
}

#[test]
fn list_runs_shows_config_status_and_result() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let done = runs.join("a-done");
    run_ok(&["train", "logistic", "--out", path_str(&done)]);
    let stopped = runs.join("b-stopped");
    run_ok(&[
        "train",
        "logistic",
        "--out",
        path_str(&stopped),
        "--set",
        "train.epochs=2",
    ]);
    fs::remove_file(stopped.join("summary.json")).unwrap();
    let out = kiln()
        .current_dir(tmp.path())
        .args(["list", "--runs"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |name: &str| text.lines().find(|l| l.contains(name)).unwrap().to_string();
    let a = line("a-done");
    assert!(
        a.contains("logistic") && a.contains("done") && a.contains("test accuracy 100.00%"),
        "{a}"
    );
    let b = line("b-stopped");
    assert!(b.contains("stopped") && b.contains("kiln resume"), "{b}");
}

/// From any directory inside the checkout, config names, data paths and `runs/` resolve
/// against the repository root, and paths typed on the command line against the directory
/// they were typed in; outside a checkout kiln says which directory it needs.
#[test]
fn runs_from_any_directory_inside_the_checkout() {
    let tmp = tempfile::tempdir().unwrap();
    let deep = root().join("crates").join("runner").join("src");
    // The run directory, relative to `deep`.
    let up = "../".repeat(deep.components().count() - 1);
    let rel = format!(
        "{up}{}",
        tmp.path()
            .join("run")
            .to_str()
            .unwrap()
            .trim_start_matches('/')
    );
    let kiln_in = |dir: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new(kiln_path())
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = kiln_in(
        &deep,
        &[
            "train",
            "logistic",
            "--set",
            "train.epochs=5",
            "--out",
            &rel,
        ],
    );
    assert!(ok, "{err}");
    assert!(tmp.path().join("run").join("summary.json").is_file());
    let (ok, stdout, err) = kiln_in(&deep, &["eval", &rel]);
    assert!(ok, "{err}");
    assert!(stdout.contains("accuracy"), "{stdout}");

    let (ok, _, err) = kiln_in(tmp.path(), &["train", "logistic"]);
    assert!(!ok);
    assert!(
        err.trim_end().lines().count() == 1 && err.contains("not inside a kiln checkout"),
        "{err}"
    );
}

/// `--devices 0` is the backend's one device, written into the resolved config: the same
/// training as without it.
#[test]
fn device_zero_is_the_default_device() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, zero) = (tmp.path().join("plain"), tmp.path().join("zero"));
    run_ok(&["train", "logistic", "--out", path_str(&plain)]);
    run_ok(&[
        "train",
        "logistic",
        "--devices",
        "0",
        "--out",
        path_str(&zero),
    ]);
    let config = fs::read_to_string(zero.join("config.toml")).unwrap();
    assert!(config.contains("devices = [0]"), "{config}");
    assert_eq!(
        fs::read_to_string(plain.join("metrics.csv")).unwrap(),
        fs::read_to_string(zero.join("metrics.csv")).unwrap()
    );
}

/// `train.max_minutes`: a run far too long for its budget stops when the budget is spent,
/// says so in its summary, and keeps what it trained.
#[test]
fn time_budget_stops_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("budget");
    let r = run_ok(&[
        "train",
        "linear",
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=1000000",
        "--set",
        "train.max_minutes=0.01",
    ]);
    assert!(r.stderr.contains("time limit: "), "{}", r.stderr);
    let s = summary(&out);
    assert_eq!(s["training"]["stop_reason"], "time_limit", "{s}");
    let epochs = fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;
    assert!((1..1_000_000).contains(&epochs), "{epochs} epochs");
    assert!(out.join("model.bpk").is_file());
    let r = run(&["train", "linear", "--set", "train.max_minutes=0"]);
    assert_clean_error(&r, "train.max_minutes: must be a positive number, got 0");
}

/// `train.stop_at` (Lightning's `stopping_threshold`): the run ends at the first epoch whose
/// monitored metric reaches the threshold, says so, and records why in its summary.
#[test]
fn threshold_ends_the_run_at_the_first_epoch_that_reaches_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("threshold");
    let r = run_ok(&[
        "train",
        "logistic-multiclass",
        "--out",
        path_str(&out),
        "--set",
        "train.validation_split=0.2",
        "--set",
        "train.monitor=val_accuracy",
        "--set",
        "train.mode=max",
        "--set",
        "train.stop_at=0.9",
    ]);
    assert!(
        r.stderr.contains("val_accuracy reached 0.9"),
        "{}",
        r.stderr
    );
    let s = summary(&out);
    assert_eq!(s["training"]["stop_reason"], "target_reached", "{s}");
    let metrics = fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = metrics.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "val_accuracy").unwrap();
    let acc: Vec<f64> = lines
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .collect();
    let (last, before) = acc.split_last().unwrap();
    assert!(
        *last >= 0.9 && !before.is_empty() && before.iter().all(|&a| a < 0.9) && acc.len() < 200,
        "val_accuracy by epoch: {acc:?}"
    );
    assert_eq!(s["training"]["units_run"], acc.len(), "{s}");

    let r = run(&["train", "logistic", "--set", "train.stop_at=nan"]);
    assert_clean_error(&r, "train.stop_at: must be a finite number, got NaN");
    // DQN's `params.solve_at` already ends a solved run; the two together are refused.
    let r = run(&["train", "dqn-cartpole", "--set", "train.stop_at=100"]);
    assert_clean_error(
        &r,
        "train.stop_at: 100: params.solve_at already ends a solved run",
    );
}
