//! End to end: autoencoder, VAE and GAN through the `kiln` CLI, on the 8×8 digits in `data/`
//! (seconds per run), with the pictures, `kiln sample`, the judge and exact resume after
//! `kill -9`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn metrics(dir: &Path) -> String {
    fs::read_to_string(dir.join("metrics.csv")).unwrap()
}

fn vae_args(epochs: &str) -> Vec<String> {
    DIGITS_VAE
        .iter()
        .map(|s| s.to_string())
        .chain(["--set".into(), format!("train.epochs={epochs}")])
        .collect()
}

#[test]
fn vae_learns_draws_pictures_samples_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let args = vae_args("30");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut full = vec!["train"];
    full.extend(&args);
    full.extend(["--out", path_str(&a)]);
    run_ok(&full);

    let s = summary(&a);
    assert_eq!(s["dataset"], "digits");
    let (n_train, n_val) = (
        s["train_examples"].as_u64().unwrap(),
        s["validation_examples"].as_u64().unwrap(),
    );
    assert_eq!(
        n_val,
        ((n_train + n_val) as f64 * 0.1).round() as u64,
        "validation is 10% of the training split"
    );
    let test = &s["test"];
    let (loss, bce, kl) = (
        test["loss"].as_f64().unwrap(),
        test["bce"].as_f64().unwrap(),
        test["kl"].as_f64().unwrap(),
    );
    assert!((loss - (bce + kl)).abs() < 1e-3 * loss, "{test}");
    assert!(kl > 0.0, "{test}");
    // metrics.csv: the loss fell, and bce/kl are reported for both parts.
    let csv = metrics(&a);
    let header = csv.lines().next().unwrap();
    assert_eq!(
        header,
        "epoch,train_loss,train_bce,train_kl,val_loss,val_bce,val_kl,lr"
    );
    let col = |line: &str| line.split(',').nth(4).unwrap().parse::<f64>().unwrap();
    let first = col(csv.lines().nth(1).unwrap());
    let last = col(csv.lines().last().unwrap());
    assert!(last < 0.9 * first, "validation loss {first} → {last}");
    for f in [
        "reconstructions.png",
        "interpolation.png",
        "latent.png",
        "manifold.png",
        "samples-epoch-001.png",
        "samples-epoch-030.png",
        "loss.png",
        "kl.png",
        "report.md",
    ] {
        assert!(a.join(f).is_file(), "missing {f}");
    }

    // kiln sample: a PNG grid of n images (8×8 images at 10× with 2-px gaps: 3×3 of 82 px).
    let png = tmp.path().join("s.png");
    let r = run_ok(&[
        "sample",
        path_str(&a),
        "--n",
        "9",
        "--seed",
        "4",
        "--out",
        path_str(&png),
    ]);
    assert_eq!(r.stdout.trim(), path_str(&png));
    let img = image::open(&png).unwrap().to_luma8();
    assert_eq!(img.dimensions(), (2 + 3 * 82, 2 + 3 * 82));
    let again = tmp.path().join("s2.png");
    run_ok(&[
        "sample",
        path_str(&a),
        "--n",
        "9",
        "--seed",
        "4",
        "--out",
        path_str(&again),
    ]);
    assert_eq!(
        fs::read(&png).unwrap(),
        fs::read(&again).unwrap(),
        "same seed, same samples"
    );

    // Killed after a checkpoint and resumed: the same metrics as the run above.
    let b = tmp.path().join("b");
    killed_and_resumed(&b, &args);
    assert_eq!(
        metrics(&a),
        metrics(&b),
        "resumed VAE differs from the uninterrupted run"
    );
}

#[test]
fn autoencoder_conv_reconstructs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ae");
    run_ok(&[
        "train",
        "autoencoder",
        "--out",
        path_str(&out),
        "--set",
        "dataset=digits",
        "--set",
        "params.net.kind=conv",
        "--set",
        "params.net.channels=[8,16]",
        "--set",
        "params.net.latent=8",
        "--set",
        "train.epochs=6",
        "--set",
        "train.learning_rate=0.003",
    ]);
    let csv = metrics(&out);
    assert!(csv.starts_with("epoch,train_loss,val_loss,lr\n"), "{csv}");
    let val = |line: &str| line.split(',').nth(2).unwrap().parse::<f64>().unwrap();
    let (first, last) = (
        val(csv.lines().nth(1).unwrap()),
        val(csv.lines().last().unwrap()),
    );
    assert!(last < 0.9 * first, "validation BCE {first} → {last}");
    assert!(out.join("reconstructions.png").is_file());
    // The plain autoencoder samples from a Gaussian fitted to its training codes.
    run_ok(&["sample", path_str(&out), "--n", "4"]);
    assert!(out.join("samples-seed-0.png").is_file());
    let p = run_ok(&[
        "predict",
        path_str(&out),
        "--image",
        path_str(&out.join("samples-seed-0.png")),
    ]);
    assert!(p.stdout.starts_with("code: ["), "{}", p.stdout);
    assert_eq!(p.stdout.matches(',').count(), 7, "{}", p.stdout);
}

fn cnn_digits(dir: &Path) -> PathBuf {
    let out = dir.join("cnn");
    run_ok(&[
        "train",
        "cnn",
        "--out",
        path_str(&out),
        "--set",
        "dataset=digits",
        "--set",
        "train.epochs=4",
    ]);
    out
}

/// The small digits GAN of `common` trained 30 epochs (a few hundred milliseconds each),
/// judged on 200 samples.
const JUDGED_DIGITS_GAN: [&str; 4] = [
    "--set",
    "train.epochs=30",
    "--set",
    "params.judge_samples=200",
];

/// `kiln bench gan` times whole training batches (a discriminator and a generator step).
#[test]
fn gan_bench_prints_throughput() {
    let r = run_ok(&[
        "bench",
        "gan",
        "--set",
        "dataset=digits",
        "--set",
        "params.net.kind=mlp",
        "--backend",
        "flex",
        "--batches",
        "4",
    ]);
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with("| flex | 64 |"))
        .unwrap_or_else(|| panic!("no flex row: {}", r.stdout));
    let rate: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap();
    assert!(rate > 0.0, "{row}");
    assert!(r.stdout.contains("generator step"), "{}", r.stdout);
}

#[test]
fn gan_trains_is_judged_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let judge = cnn_digits(tmp.path());
    let mut args = vec![
        "gan",
        "--judge",
        path_str(&judge),
        "--set",
        "params.ema=0.9",
    ];
    args.extend(DIGITS_MLP_GAN);
    args.extend(JUDGED_DIGITS_GAN);
    let a = tmp.path().join("a");
    let mut full = vec!["train"];
    full.extend(&args);
    full.extend(["--out", path_str(&a)]);
    run_ok(&full);
    let csv = metrics(&a);
    // The judge measures every epoch: the moving-average generator's samples and the live one's.
    assert!(
        csv.starts_with("epoch,d_loss,g_loss,d_real,d_fake,judge_confident,judge_smallest_class,judge_frechet_train,judge_confident_live,lr_generator,lr_discriminator\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 31);
    for line in csv.lines().skip(1) {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        assert!(v[1..].iter().all(|x| x.is_finite()), "{line}");
        for i in [3, 4, 5, 6, 8] {
            assert!((0.0..=1.0).contains(&v[i]), "column {i}: {line}");
        }
        assert!(v[7] > 0.0, "{line}");
    }
    // The samples move towards the training images as the generator learns (≈ 210 → ≈ 40).
    let frechet = |line: &str| line.split(',').nth(7).unwrap().parse::<f64>().unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(
        frechet(rows[29]) < 0.5 * frechet(rows[0]),
        "judge_frechet_train did not fall: {csv}"
    );
    let s = summary(&a);
    let verdict = &s["judge"]["verdict"];
    assert_eq!(verdict["samples"], 200);
    let hist: u64 = verdict["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(hist, 200);
    let share = verdict["confident_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share));
    let test_share = verdict["test_confident_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&test_share));
    assert!(verdict["frechet_distance"].as_f64().unwrap() > 0.0);
    for f in [
        "samples.png",
        "samples-epoch-030.png",
        "d_loss.png",
        "model.bpk",
    ] {
        assert!(a.join(f).is_file(), "missing {f}");
    }
    let report = fs::read_to_string(a.join("report.md")).unwrap();
    assert!(report.contains("Fréchet distance"), "{report}");

    // Both networks and both optimizers come back from the checkpoint after kill -9.
    let b = tmp.path().join("b");
    killed_and_resumed(&b, &args);
    assert_eq!(
        metrics(&a),
        metrics(&b),
        "resumed GAN differs from the uninterrupted run"
    );
    run_ok(&["sample", path_str(&b), "--n", "16"]);
    // Any sampling setting can be judged: truncated noise, measured by the same judge.
    let r = run_ok(&[
        "sample",
        path_str(&b),
        "--n",
        "50",
        "--truncation",
        "0.8",
        "--judge",
        path_str(&judge),
    ]);
    assert!(
        r.stderr.contains("of 50 samples judged with confidence"),
        "{}",
        r.stderr
    );
    let r = run(&["sample", path_str(&b), "--truncation", "0"]);
    assert_clean_error(&r, "--truncation");
    let r = run(&["sample", path_str(&b), "--class", "3"]);
    assert_clean_error(&r, "is not a class-conditional GAN");
}

/// A class-conditional GAN draws the class it is asked for: the judge agrees with the asked
/// class far above chance (10%), every epoch's row has the agreement, and `kiln sample` draws
/// the classes in turn.
#[test]
fn conditional_gan_draws_the_class_it_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let judge = cnn_digits(tmp.path());
    let a = tmp.path().join("c");
    let mut args = vec![
        "train",
        "gan",
        "--judge",
        path_str(&judge),
        "--out",
        path_str(&a),
    ];
    args.extend(DIGITS_MLP_GAN);
    args.extend(JUDGED_DIGITS_GAN);
    run_ok(&[&args[..], &["--set", "params.net.conditional=projection"]].concat());
    let csv = metrics(&a);
    assert!(
        csv.starts_with("epoch,d_loss,g_loss,d_real,d_fake,judge_confident,judge_smallest_class,judge_frechet_train,judge_class_agreement,lr_generator,lr_discriminator\n"),
        "{csv}"
    );
    let s = summary(&a);
    assert!(
        s["architecture"]
            .as_str()
            .unwrap()
            .starts_with("class-conditional"),
        "{s}"
    );
    let agreement = s["judge"]["verdict"]["asked_class_agreement"]
        .as_f64()
        .unwrap();
    assert!(agreement > 0.5, "judged the asked class: {agreement}");
    let report = fs::read_to_string(a.join("report.md")).unwrap();
    assert!(report.contains("judged the class asked for"), "{report}");
    let r = run_ok(&[
        "sample",
        path_str(&a),
        "--n",
        "100",
        "--judge",
        path_str(&judge),
        "--out",
        path_str(&tmp.path().join("grid.png")),
    ]);
    assert!(
        r.stderr.contains("judged the class asked for"),
        "{}",
        r.stderr
    );
    assert!(tmp.path().join("grid.png").is_file());
    // One class, by name or index; the judge names that class for most of its samples.
    let r = run_ok(&[
        "sample",
        path_str(&a),
        "--n",
        "50",
        "--class",
        "3",
        "--judge",
        path_str(&judge),
    ]);
    let agree: f64 = r
        .stderr
        .split("; ")
        .find_map(|p| p.strip_suffix("% judged the class asked for\n"))
        .unwrap_or_else(|| panic!("{}", r.stderr))
        .parse()
        .unwrap();
    assert!(agree > 50.0, "{}", r.stderr);
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(a.join("generative.json")).unwrap()).unwrap();
    let name = info["class_names"][7].as_str().unwrap().to_string();
    run_ok(&["sample", path_str(&a), "--n", "4", "--class", &name]);
    let r = run(&["sample", path_str(&a), "--class", "10"]);
    assert_clean_error(&r, "--class: \"10\" is neither a class of this run");
    // The `gan-conditional` config: a projection DCGAN.
    let d = tmp.path().join("d");
    run_ok(&[
        "train",
        "gan-conditional",
        "--set",
        "dataset=digits",
        "--set",
        "train.epochs=1",
        "--out",
        path_str(&d),
    ]);
    let arch = summary(&d)["architecture"].as_str().unwrap().to_string();
    assert!(
        arch.starts_with("class-conditional DCGAN") && arch.contains("projects"),
        "{arch}"
    );
    assert!(d.join("samples-epoch-001.png").is_file());
}

#[test]
fn generative_bad_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let judge = cnn_digits(tmp.path());
    // kiln sample on a classifier.
    let r = run(&["sample", path_str(&judge)]);
    assert_clean_error(&r, "cannot generate samples");
    // A judge that is not an image classifier: rejected before training.
    let vae = tmp.path().join("vae");
    let args = vae_args("1");
    let mut full: Vec<&str> = vec!["train"];
    full.extend(args.iter().map(String::as_str));
    full.extend(["--out", path_str(&vae)]);
    run_ok(&full);
    // The judge of `kiln sample` is for GAN runs.
    let r = run(&["sample", path_str(&vae), "--judge", path_str(&judge)]);
    assert_clean_error(&r, "--truncation, --judge and --class");
    let r = run(&[
        "train",
        "gan",
        "--set",
        "dataset=digits",
        "--judge",
        path_str(&vae),
        "--out",
        path_str(&tmp.path().join("g")),
    ]);
    assert_clean_error(&r, "not an image classifier run");
    assert!(
        !tmp.path().join("g").exists(),
        "a run directory was left behind"
    );
    // A judge directory that is not a run at all.
    let r = run(&[
        "train",
        "gan",
        "--set",
        "dataset=digits",
        "--judge",
        path_str(tmp.path()),
    ]);
    assert_clean_error(&r, "not a kiln run directory");
    // Bad GAN settings name the field.
    for (set, field) in [
        ("params.label_smoothing=0.7", "params.label_smoothing"),
        ("params.ema=1.0", "params.ema"),
        ("params.net.d_widths=[8]", "params.net.d_widths"),
    ] {
        let r = run(&["train", "gan", "--set", "dataset=digits", "--set", set]);
        assert_clean_error(&r, field);
    }
    let r = run(&[
        "train",
        "vae",
        "--set",
        "dataset=digits",
        "--set",
        "params.net.latent=0",
    ]);
    assert_clean_error(&r, "params.net.latent");
}

/// Ctrl-C (SIGINT) drops the unfinished epoch, keeps the last checkpoint, says how to resume,
/// and the resumed run matches an uninterrupted one.
#[test]
fn ctrl_c_stops_cleanly_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let args = vae_args("30");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let straight = tmp.path().join("straight");
    let mut full = vec!["train"];
    full.extend(&args);
    full.extend(["--out", path_str(&straight)]);
    run_ok(&full);

    let out = tmp.path().join("interrupted");
    let mut child = kiln()
        .arg("train")
        .args(&args)
        .args(["--out", path_str(&out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let latest = out.join("checkpoints").join("latest");
    let started = Instant::now();
    while !latest.exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before Ctrl-C"
    );
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: interrupted during epoch")
            && last.contains(&format!("kiln resume {}", path_str(&out))),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(summary(&out)["status"], "interrupted");
    run_ok(&["resume", path_str(&out)]);
    assert_eq!(metrics(&straight), metrics(&out));
}

/// `train.lr_decay` scales both of the GAN's learning rates every epoch: the first epoch (η)
/// is the same to the byte as without decay, the second (η·γ) is not.
#[test]
fn gan_follows_train_lr_decay() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = |decay: &str| {
        let out = tmp.path().join(format!("gan-{decay}"));
        let mut args = vec!["train", "gan", "--out", path_str(&out)];
        args.extend(DIGITS_MLP_GAN);
        let decay = format!("train.lr_decay={decay}");
        args.extend(["--set", "train.epochs=2", "--set", &decay]);
        run_ok(&args);
        metrics_rows(&out)
    };
    let (constant, halved) = (rows("1.0"), rows("0.5"));
    assert_eq!(constant[0], halved[0]);
    assert_ne!(constant[1], halved[1]);
}

/// `train.schedule = "cosine"` drives both of the GAN's optimizers: over three epochs each
/// rate is η, η/2, 0 (recorded as `lr_generator` and `lr_discriminator`); the first epoch is
/// the same to the byte as a constant rate's, the second is not.
#[test]
fn gan_follows_a_cosine_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |schedule: &str| {
        let out = tmp.path().join(format!("gan-{schedule}"));
        let mut args = vec!["train", "gan", "--out", path_str(&out)];
        args.extend(DIGITS_MLP_GAN);
        let schedule = format!("train.schedule=\"{schedule}\"");
        args.extend(["--set", "train.epochs=3", "--set", &schedule]);
        run_ok(&args);
        out
    };
    let (constant, cosine) = (train("constant"), train("cosine"));
    for column in ["lr_generator", "lr_discriminator"] {
        assert_eq!(metrics_column(&constant, column), [0.001; 3], "{column}");
        let lr = metrics_column(&cosine, column);
        assert!(
            lr[0] == 0.001 && (lr[1] - 0.0005).abs() < 1e-12 && lr[2].abs() < 1e-12,
            "{column}: {lr:?}"
        );
    }
    let (a, b) = (metrics_rows(&constant), metrics_rows(&cosine));
    assert_eq!(a[0], b[0]);
    assert_ne!(a[1], b[1]);
    assert!(cosine.join("lr_generator.png").is_file());
}

/// `train.tensorboard = true`: an event file under `tensorboard/` holds every metric of every
/// epoch as a scalar (the numbers of metrics.csv, as f32) and the per-epoch sample grids as
/// PNG images; TensorBoard's framing checksums hold.
#[test]
fn vae_writes_tensorboard_scalars_and_sample_images() {
    use kiln_core::engine::tensorboard::{event_files, read_events};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vae");
    let mut args = vec!["train"];
    args.extend(DIGITS_VAE);
    args.extend([
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=2",
        "--set",
        "train.tensorboard=true",
    ]);
    run_ok(&args);
    let files = event_files(&out);
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    for (unit, name) in [(1, "val_loss"), (2, "val_loss"), (2, "lr"), (1, "train_kl")] {
        let want = metrics_column(&out, name)[unit - 1] as f32;
        let got: Vec<f32> = events
            .iter()
            .filter(|e| e.step == unit as i64)
            .flat_map(|e| e.scalars.iter().filter(|(t, _)| t == name).map(|(_, v)| *v))
            .collect();
        assert_eq!(got, [want], "{name} at epoch {unit}");
    }
    let samples: Vec<_> = events
        .iter()
        .flat_map(|e| {
            e.images
                .iter()
                .filter(|i| i.0 == "samples")
                .map(move |i| (e.step, i))
        })
        .collect();
    assert_eq!(samples.len(), 2);
    let (step, (_, w, h, png)) = samples[1];
    assert_eq!(step, 2);
    let file = image::load_from_memory(png).unwrap();
    assert_eq!((file.width(), file.height()), (*w, *h));
    assert_eq!(
        png,
        &std::fs::read(out.join("samples-epoch-002.png")).unwrap()
    );
}
