//! End to end: MLP and CNN image classifiers through the `kiln` CLI.

mod common;

use std::fs;
use std::io::Read;
use std::path::Path;

use common::*;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn require_fashion_mnist() {
    assert!(
        Path::new(FASHION)
            .join("t10k-images-idx3-ubyte.gz")
            .is_file(),
        "Fashion-MNIST is not installed: `apt install dataset-fashion-mnist` (.ci/run does)"
    );
}

/// Test image `i` of Fashion-MNIST (28×28, light object on black) and its label.
fn fashion_test_image(i: usize) -> (Vec<u8>, u8) {
    let gunzip = |name: &str| {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(Path::new(FASHION).join(name)).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let images = gunzip("t10k-images-idx3-ubyte.gz");
    let labels = gunzip("t10k-labels-idx1-ubyte.gz");
    (
        images[16 + i * 784..16 + (i + 1) * 784].to_vec(),
        labels[8 + i],
    )
}

#[test]
fn cnn_learns_a_fashion_mnist_subset_and_predicts_a_photo() {
    require_fashion_mnist();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cnn");
    run_ok(&[
        "train",
        "cnn",
        "--out",
        path_str(&out),
        "--set",
        "dataset=fashion-mnist",
        "--set",
        "params.train_limit=8000",
        "--set",
        "params.test_limit=1000",
        "--set",
        "train.epochs=3",
    ]);
    let s = summary(&out);
    let acc = s["test"]["accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.80,
        "CNN test accuracy on the Fashion-MNIST subset: {acc}"
    );
    assert_eq!(s["test_examples"], 1000);
    for f in [
        "confusion_matrix.png",
        "misclassified.png",
        "loss.png",
        "accuracy.png",
        "model.bpk",
        "report.md",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }

    // A "photo": the first test image (an ankle boot), dark on a light background, 3× larger.
    let (pixels, label) = fashion_test_image(0);
    assert_eq!(label, 9);
    let photo = image::GrayImage::from_fn(84, 84, |x, y| {
        image::Luma([255 - pixels[(y / 3 * 28 + x / 3) as usize]])
    });
    let png = tmp.path().join("boot.png");
    photo.save(&png).unwrap();
    let p = run_ok(&["predict", path_str(&out), "--image", path_str(&png)]);
    let top: Vec<&str> = p.stdout.trim().split(", ").collect();
    assert_eq!(top.len(), 3, "top 3 classes: {}", p.stdout);
    assert!(top[0].starts_with("Ankle boot "), "top class: {}", p.stdout);
    let probs: Vec<f64> = top
        .iter()
        .map(|t| t.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(probs[0] >= probs[1] && probs[1] >= probs[2] && probs.iter().sum::<f64>() <= 1.0001);

    let not_image = tmp.path().join("notes.png");
    fs::write(&not_image, "hello").unwrap();
    let r = run(&["predict", path_str(&out), "--image", path_str(&not_image)]);
    assert_clean_error(&r, "not a readable PNG or JPEG image");

    let e = run_ok(&["eval", path_str(&out)]);
    let eval: serde_json::Value = serde_json::from_str(&e.stdout).unwrap();
    assert_eq!(eval["test"]["accuracy"], s["test"]["accuracy"]);
}

#[test]
fn xor_config_learns_xor_from_a_random_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("xor");
    run_ok(&["train", "xor", "--out", path_str(&out)]);
    assert_eq!(summary(&out)["test"]["accuracy"].as_f64().unwrap(), 1.0);
    for (input, want) in [("0,0", "0"), ("0,1", "1"), ("1,0", "1"), ("1,1", "0")] {
        let p = run_ok(&["predict", path_str(&out), "--input", input]);
        assert!(
            p.stdout.starts_with(&format!("{want} ")),
            "xor({input}) -> {}",
            p.stdout
        );
    }
}

#[test]
fn mlp_and_cnn_learn_the_8x8_digits() {
    let tmp = tempfile::tempdir().unwrap();
    let mlp = tmp.path().join("mlp");
    run_ok(&[
        "train",
        "mlp-relu",
        "--out",
        path_str(&mlp),
        "--set",
        "dataset=digits",
        "--set",
        "train.epochs=10",
    ]);
    let acc = summary(&mlp)["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "MLP on digits: {acc}");

    let cnn = tmp.path().join("cnn");
    run_ok(&[
        "train",
        "cnn",
        "--out",
        path_str(&cnn),
        "--set",
        "dataset=digits",
        "--set",
        "params.net.padding=same",
        "--set",
        "train.epochs=10",
        "--set",
        "params.augment.shift=1",
    ]);
    let acc = summary(&cnn)["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "CNN (same padding, augmented) on digits: {acc}");
}

#[test]
fn every_activation_trains() {
    let tmp = tempfile::tempdir().unwrap();
    for act in [
        "linear",
        "sigmoid",
        "tanh",
        "softsign",
        "relu",
        "leaky_relu",
        "softplus",
        "elu",
        "selu",
        "swish",
        "mish",
    ] {
        let out = tmp.path().join(act);
        let set = format!("params.net.activation={act}");
        run_ok(&[
            "train",
            "mlp",
            "--out",
            path_str(&out),
            "--set",
            "dataset=digits",
            "--set",
            &set,
            "--set",
            "train.epochs=3",
        ]);
        let acc = summary(&out)["test"]["accuracy"].as_f64().unwrap();
        assert!(acc > 0.5, "{act}: {acc}");
    }
}

#[test]
fn missing_mnist_says_how_to_get_it() {
    // From a bare checkout (configs/ and crates/runner/, but no data/mnist) with unreachable
    // mirrors.
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("configs")).unwrap();
    fs::create_dir_all(tmp.path().join("crates/runner")).unwrap();
    fs::copy(
        root().join("configs/cnn.toml"),
        tmp.path().join("configs/cnn.toml"),
    )
    .unwrap();
    let out = kiln()
        .current_dir(tmp.path())
        .env("KILN_MIRRORS", "http://127.0.0.1:9/")
        .args(["train", "cnn", "--set", "dataset=mnist"])
        .output()
        .unwrap();
    let r = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    };
    assert_clean_error(
        &r,
        "MNIST is not on this machine and could not be downloaded",
    );
    assert!(
        r.stderr.contains("--data-dir") && r.stderr.contains("--set dataset=fashion-mnist"),
        "{}",
        r.stderr
    );

    let r = run(&["train", "cnn", "--data-dir", path_str(tmp.path())]);
    assert_clean_error(&r, "MNIST IDX files not found");
}

/// IDX bytes: magic (0, 0, 8 = u8, rank), big-endian dimensions, then the values.
fn idx_bytes(dims: &[u32], values: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(values);
    out
}

/// `dataset = "auto"` (the default of `cnn` and `mlp`) with no network and no MNIST: the run
/// completes on the next data set available here, says so before training, and records it in
/// config.toml, summary.json and report.md.
#[test]
fn auto_dataset_falls_back_offline_and_records_it() {
    let have_mnist = ["data/mnist", "/usr/share/datasets/mnist"]
        .iter()
        .any(|d| root().join(d).join("t10k-labels-idx1-ubyte.gz").is_file());
    if have_mnist {
        eprintln!("MNIST is on this machine: the offline fallback cannot be observed here");
        return;
    }
    let expected = if Path::new(FASHION).is_dir() {
        "fashion-mnist"
    } else {
        "digits"
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cnn");
    let started = std::time::Instant::now();
    let o = kiln()
        .env("KILN_MIRRORS", "http://127.0.0.1:9/")
        .args([
            "train",
            "cnn",
            "--out",
            path_str(&out),
            "--set",
            "params.train_limit=600",
            "--set",
            "params.test_limit=200",
            "--set",
            "train.epochs=1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("MNIST is not available offline") && stderr.contains("--data-dir DIR"),
        "{stderr}"
    );
    // The probe fails in seconds (the test's whole run, training included, is short).
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    let s = summary(&out);
    assert_eq!(s["dataset"], expected);
    assert_eq!(s["dataset_requested"], "auto");
    let config = fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("dataset = \"{expected}\"")),
        "{config}"
    );
    assert!(config.contains("dataset_requested = \"auto\""), "{config}");
    let report = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("`dataset = \"auto\"` chose it"), "{report}");
    // `resume` and `eval` read the settled data set, not `auto` again.
    run_ok(&["eval", path_str(&out)]);
}

/// `dataset = "auto"` with `--data-dir`: the directory is MNIST's, and no fallback is taken.
#[test]
fn auto_dataset_with_data_dir_is_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 40u32;
    let pixels: Vec<u8> = (0..n * 784).map(|i| ((i * 37) % 256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    for (name, bytes) in [
        ("train-images-idx3-ubyte", idx_bytes(&[n, 28, 28], &pixels)),
        ("train-labels-idx1-ubyte", idx_bytes(&[n], &labels)),
        ("t10k-images-idx3-ubyte", idx_bytes(&[n, 28, 28], &pixels)),
        ("t10k-labels-idx1-ubyte", idx_bytes(&[n], &labels)),
    ] {
        fs::write(tmp.path().join(name), bytes).unwrap();
    }
    let out = tmp.path().join("run");
    let r = run_ok(&[
        "train",
        "mlp",
        "--data-dir",
        path_str(tmp.path()),
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=1",
    ]);
    assert!(!r.stderr.contains("not available offline"), "{}", r.stderr);
    let s = summary(&out);
    assert_eq!(s["dataset"], "mnist");
    assert_eq!(s["dataset_requested"], "auto");
}

#[test]
fn corrupt_idx_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        fs::write(tmp.path().join(name), [0u8, 0, 8, 3, 0, 0, 0, 9]).unwrap();
    }
    let r = run(&[
        "train",
        "cnn",
        "--data-dir",
        path_str(tmp.path()),
        "--out",
        path_str(&tmp.path().join("r")),
    ]);
    assert_clean_error(&r, "train-images-idx3-ubyte: truncated IDX header");
}

#[test]
fn bench_prints_throughput() {
    let r = run_ok(&[
        "bench",
        "mlp",
        "--set",
        "dataset=digits",
        "--backend",
        "flex",
        "--batches",
        "5",
    ]);
    assert!(r.stdout.contains("| flex | 64 |"), "{}", r.stdout);
    assert!(r.stdout.contains("MiB"), "{}", r.stdout);
}

/// Dropout masks come from the seed and the epoch: the same seed gives the same metrics, and
/// a run stopped after 3 epochs and resumed to 6 matches one that ran 6 epochs straight.
#[test]
fn dropout_runs_are_reproducible_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |name: &str, seed: &str, epochs: &str| {
        let out = tmp.path().join(name);
        run_ok(&[
            "train",
            "mlp",
            "--out",
            path_str(&out),
            "--seed",
            seed,
            "--set",
            "dataset=digits",
            "--set",
            "params.net.dropout=0.3",
            "--set",
            &format!("train.epochs={epochs}"),
        ]);
        out
    };
    let metrics = |dir: &Path| fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let a = train("a", "5", "6");
    let b = train("b", "5", "6");
    let c = train("c", "6", "6");
    assert_eq!(metrics(&a).lines().count(), 7);
    assert_eq!(metrics(&a), metrics(&b), "same seed, different metrics");
    assert_ne!(metrics(&a), metrics(&c), "different seeds should differ");

    let short = train("short", "5", "3");
    let config = short.join("config.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replace("epochs = 3", "epochs = 6")).unwrap();
    run_ok(&["resume", path_str(&short)]);
    assert_eq!(
        metrics(&a),
        metrics(&short),
        "resumed run's metrics differ from the uninterrupted run"
    );
}

/// The CNN's flex operations (batch norm → pool → ReLU, the convolutions' gradients) sum in a
/// fixed order: two runs with the same seed write the same metrics to the last digit.
#[test]
fn cnn_runs_are_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |name: &str| {
        let out = tmp.path().join(name);
        run_ok(&[
            "train",
            "cnn",
            "--out",
            path_str(&out),
            "--set",
            "dataset=digits",
            "--set",
            "train.epochs=3",
        ]);
        fs::read_to_string(out.join("metrics.csv")).unwrap()
    };
    let (a, b) = (train("a"), train("b"));
    assert_eq!(a.lines().count(), 4, "{a}");
    assert_eq!(a, b, "same seed, different metrics");
}

/// The CNN off flex: on ndarray the first convolution is kiln's batched im2col product and
/// everything after it Burn's own operations (no `flex_ops`). A few epochs on the digits must
/// lower the loss.
#[test]
fn cnn_trains_on_ndarray() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nd");
    run_ok(&[
        "train",
        "cnn",
        "--backend",
        "ndarray",
        "--out",
        path_str(&out),
        "--set",
        "dataset=digits",
        "--set",
        "train.epochs=3",
    ]);
    let csv = fs::read_to_string(out.join("metrics.csv")).unwrap();
    let loss: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(loss[2] < 0.7 * loss[0], "train loss {loss:?}");
    let s = summary(&out);
    assert_eq!(s["training"]["backend"], "ndarray");
    assert!(
        s["test"]["accuracy"].as_f64().unwrap() > 0.7,
        "{}",
        s["test"]
    );
}
