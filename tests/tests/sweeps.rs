//! End to end: `kiln sweep` here and through a real SLURM (`scripts/slurm-local.sh start`).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The numbers of `results.csv`: (point, learning rate, seed, accuracy).
fn results(dir: &Path) -> Vec<(String, String, u64, f64)> {
    let text = fs::read_to_string(dir.join("results.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "point,train.learning_rate,seed,test.accuracy,epochs,seconds"
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_string(),
                f[1].trim_matches('"').to_string(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

/// Each row of the table is its run's own summary: the sweep ran ordinary `kiln train` runs.
fn check_rows_against_runs(dir: &Path, rows: &[(String, String, u64, f64)]) {
    for (name, lr, seed, acc) in rows {
        let run = dir.join(name);
        let s = summary(&run);
        assert_eq!(s["test"]["accuracy"].as_f64().unwrap(), *acc, "{name}");
        let config = fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(
            config.contains(&format!("learning_rate = {lr}")),
            "{name}: {config}"
        );
        assert!(config.contains(&format!("seed = {seed}")), "{name}");
    }
}

#[test]
fn local_sweep_runs_every_point_collects_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let r = run_ok(&[
        "sweep",
        "logistic-multiclass",
        "--grid",
        "train.learning_rate=0.001,0.05",
        "--seeds",
        "2",
        "--set",
        "train.epochs=30",
        "--out",
        path_str(&dir),
    ]);
    assert!(r.stderr.contains("4 points, 4 to run"), "{}", r.stderr);
    assert_eq!(r.stderr.matches("] p").count(), 4, "{}", r.stderr);
    let rows = results(&dir);
    assert_eq!(rows.len(), 4);
    let seeds: Vec<u64> = rows.iter().map(|r| r.2).collect();
    assert_eq!(seeds, [42, 43, 42, 43]);
    check_rows_against_runs(&dir, &rows);
    // The swept parameter matters: 30 epochs at 0.05 learn the flowers, at 0.001 they do not.
    let mean = |lr: &str| {
        let v: Vec<f64> = rows.iter().filter(|r| r.1 == lr).map(|r| r.3).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(
        mean("0.05") >= 0.9 && mean("0.05") > mean("0.001"),
        "{rows:?}"
    );
    let md = fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("| 0.05 | "), "{md}");
    assert!(md.contains("± "), "{md}");
    let png = fs::read(dir.join("results.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000);
    let status = run_ok(&["sweep", "--status", path_str(&dir)]).stdout;
    assert!(status.contains("4 points: 4 done"), "{status}");

    // Half finished: one point lost its summary (stopped after its last checkpoint), one was
    // never started. A re-run resumes the first, trains the second, leaves the rest alone.
    let metrics = |p: &str| fs::read_to_string(dir.join(p).join("metrics.csv")).unwrap();
    let (a, b) = (rows[1].0.clone(), rows[2].0.clone());
    let before = (metrics(&a), metrics(&b), metrics(&rows[0].0));
    fs::remove_file(dir.join(&a).join("summary.json")).unwrap();
    fs::remove_dir_all(dir.join(&b)).unwrap();
    let status = run_ok(&["sweep", "--status", path_str(&dir)]).stdout;
    assert!(
        status.contains(&format!("interrupted {a}"))
            && status.contains(&format!("pending     {b}")),
        "{status}"
    );
    let r = run_ok(&["sweep", path_str(&dir)]);
    assert!(
        r.stderr.contains("4 points, 2 to run (2 already done)"),
        "{}",
        r.stderr
    );
    assert_eq!(before, (metrics(&a), metrics(&b), metrics(&rows[0].0)));
    assert_eq!(results(&dir), rows);
    let log = fs::read_to_string(dir.join("logs").join(format!("{a}.log"))).unwrap();
    assert!(log.contains("resum"), "{log}");
}

#[test]
fn bad_sweeps_are_one_line_errors_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bad");
    let sweep = |grid: &str| run(&["sweep", "logistic", "--grid", grid, "--out", path_str(&out)]);
    let r = sweep("train.learning_rat=0.1,0.2");
    assert_clean_error(&r, "--grid train.learning_rat=0.1");
    assert_clean_error(&r, "learning_rat");
    assert_clean_error(&sweep("train.learning_rate="), "an empty value");
    let r = sweep("train.learning_rate=0.1,fast");
    assert_clean_error(&r, "--grid train.learning_rate=fast");
    assert_clean_error(&r, "train.learning_rate");
    assert_clean_error(&sweep("params.bogus=1,2"), "bogus");
    assert!(!out.exists(), "a bad sweep left {}", out.display());

    // --slurm where there is no sbatch.
    let empty = tmp.path().join("empty-path");
    fs::create_dir_all(&empty).unwrap();
    let o = kiln()
        .args([
            "sweep",
            "logistic",
            "--grid",
            "train.learning_rate=0.1,0.2",
            "--slurm",
            "--out",
            path_str(&out),
        ])
        .env("PATH", &empty)
        .output()
        .unwrap();
    let r = Run {
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        out: o,
    };
    assert_clean_error(&r, "--slurm: sbatch is not on PATH");
    assert!(!out.exists());

    // --dry-run writes the job array and submits nothing.
    let r = run_ok(&[
        "sweep",
        "logistic",
        "--grid",
        "train.learning_rate=0.1,0.2",
        "--seeds",
        "3",
        "--slurm",
        "--dry-run",
        "--partition",
        "debug",
        "--out",
        path_str(&out),
    ]);
    assert!(r.stdout.contains("sweep.sbatch"), "{}", r.stdout);
    let script = fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-5\n"), "{script}");
    assert!(script.contains("#SBATCH --partition=debug\n"), "{script}");
    assert!(!out.join("slurm-job-id").exists());
    let status = run_ok(&["sweep", "--status", path_str(&out)]).stdout;
    assert!(status.contains("6 points: 6 pending"), "{status}");
    assert_clean_error(
        &run(&["sweep", "--collect", path_str(&out)]),
        "no finished point",
    );
}

/// Is a SLURM controller answering with a usable node?
fn slurm_up() -> bool {
    Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && {
                let s = String::from_utf8_lossy(&o.stdout);
                s.contains("idle") || s.contains("mixed") || s.contains("alloc")
            }
        })
}

#[test]
#[ignore = "needs a SLURM cluster (`sudo scripts/slurm-local.sh start`); `just test` runs it when `sinfo` answers"]
fn slurm_sweep_runs_as_a_job_array() {
    assert!(
        slurm_up(),
        "no SLURM cluster answers `sinfo` (start one with `sudo scripts/slurm-local.sh start`)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("slurm");
    let r = run_ok(&[
        "sweep",
        "logistic",
        "--grid",
        "train.learning_rate=0.05,0.1",
        "--seeds",
        "2",
        "--slurm",
        "--time",
        "00:10:00",
        "--out",
        path_str(&dir),
    ]);
    assert!(r.stdout.contains("submitted job array"), "{}", r.stdout);
    assert!(dir.join("slurm-job-id").is_file());
    let started = Instant::now();
    let status = loop {
        let s = run_ok(&["sweep", "--status", path_str(&dir)]).stdout;
        if s.contains("4 points: 4 done") || started.elapsed() > Duration::from_secs(300) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(status.contains("4 points: 4 done"), "{status}");
    run_ok(&["sweep", "--collect", path_str(&dir)]);
    let rows = results(&dir);
    assert_eq!(rows.len(), 4);
    check_rows_against_runs(&dir, &rows);
    // The logistic config separates setosa from versicolor perfectly at both rates.
    assert!(rows.iter().all(|r| r.3 == 1.0), "{rows:?}");
    // Each task left SLURM's own log beside the point's.
    let slurm_logs = fs::read_dir(dir.join("logs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("slurm-"))
        .count();
    assert_eq!(slurm_logs, 4);
}
