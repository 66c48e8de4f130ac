//! End to end: MLP and CNN image classifiers through the `kiln` CLI.

mod common;

use std::fs;
use std::path::Path;

use common::*;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// scikit-learn's 8×8 digits (data/digits.csv, 0–16) as an MNIST-style IDX set the test writes
/// itself: each digit scaled 3× to 24×24 inside a 2-pixel border (28×28, 0–255, light on
/// black), the first 1,437 images for training and the other 360 as the test files, under
/// MNIST's dotted file names (as the PyPI wheel spells them). Returns the test images and
/// labels.
fn write_digits_as_idx(dir: &Path) -> (Vec<Vec<u8>>, Vec<u8>) {
    let text = fs::read_to_string(root().join("data/digits.csv")).unwrap();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for line in text.lines().skip(1) {
        let v: Vec<u8> = line.split(',').map(|c| c.trim().parse().unwrap()).collect();
        let mut img = vec![0u8; 28 * 28];
        for y in 0..24 {
            for x in 0..24 {
                img[(y + 2) * 28 + x + 2] = (v[y / 3 * 8 + x / 3] as u32 * 255 / 16) as u8;
            }
        }
        images.push(img);
        labels.push(v[64]);
    }
    let n_train = 1437;
    let write = |name: &str, dims: &[u32], values: Vec<u8>| {
        fs::write(dir.join(name), idx_bytes(dims, &values)).unwrap();
    };
    fs::create_dir_all(dir).unwrap();
    let n_test = (images.len() - n_train) as u32;
    write(
        "train-images.idx3-ubyte",
        &[n_train as u32, 28, 28],
        images[..n_train].concat(),
    );
    write(
        "train-labels.idx1-ubyte",
        &[n_train as u32],
        labels[..n_train].to_vec(),
    );
    write(
        "t10k-images.idx3-ubyte",
        &[n_test, 28, 28],
        images[n_train..].concat(),
    );
    write(
        "t10k-labels.idx1-ubyte",
        &[n_test],
        labels[n_train..].to_vec(),
    );
    (images[n_train..].to_vec(), labels[n_train..].to_vec())
}

/// The default `cnn` network on a 28×28 IDX set from `--data-dir` (MNIST's path through the
/// IDX reader, no download): it learns, leaves its pictures, and `predict` reads a "photo" —
/// dark ink on light paper, 3× larger — and names its digit.
#[test]
fn cnn_learns_28x28_idx_digits_and_predicts_a_photo() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("idx");
    let (test_images, test_labels) = write_digits_as_idx(&data);
    let out = tmp.path().join("cnn");
    run_ok(&[
        "train",
        "cnn",
        "--out",
        path_str(&out),
        "--data-dir",
        path_str(&data),
        "--set",
        "dataset=mnist",
        "--set",
        "train.epochs=4",
    ]);
    let s = summary(&out);
    let acc = s["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.90, "CNN test accuracy on the 28×28 digits: {acc}");
    assert_eq!(s["test_examples"], 360);
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

    // The first test image of a 0, dark on a light background, 84×84.
    let i = test_labels.iter().position(|&l| l == 0).unwrap();
    let pixels = &test_images[i];
    let photo = image::GrayImage::from_fn(84, 84, |x, y| {
        image::Luma([255 - pixels[(y / 3 * 28 + x / 3) as usize]])
    });
    let png = tmp.path().join("zero.png");
    photo.save(&png).unwrap();
    let p = run_ok(&["predict", path_str(&out), "--image", path_str(&png)]);
    let top: Vec<&str> = p.stdout.trim().split(", ").collect();
    assert_eq!(top.len(), 3, "top 3 classes: {}", p.stdout);
    assert!(top[0].starts_with("0 "), "top class: {}", p.stdout);
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

/// The classic architectures' configs at a small size: a VGG-style stack (two convolutions
/// per block) and an Inception network learn the 8×8 digits.
#[test]
fn vgg_and_inception_learn_the_8x8_digits() {
    let tmp = tempfile::tempdir().unwrap();
    for (config, extra) in [
        (
            "vgg",
            vec![
                "--set",
                "params.net.conv=[16, 32]",
                "--set",
                "params.net.dense=[64]",
            ],
        ),
        (
            "inception",
            vec![
                "--set",
                "params.net.stages=[[32], [64]]",
                "--set",
                "params.net.stem=16",
            ],
        ),
    ] {
        let out = tmp.path().join(config);
        let mut args = vec![
            "train",
            config,
            "--out",
            path_str(&out),
            "--set",
            "dataset=digits",
            "--set",
            "train.epochs=6",
            "--set",
            "train.batch_size=32",
        ];
        args.extend(extra);
        run_ok(&args);
        let acc = summary(&out)["test"]["accuracy"].as_f64().unwrap();
        assert!(acc > 0.9, "{config} on digits: {acc}");
    }
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
    // A bare checkout (configs/cnn.toml, data/digits.csv): no data/mnist, whatever the real
    // checkout has downloaded.
    let tmp = tempfile::tempdir().unwrap();
    let checkout = tmp.path().join("checkout");
    for d in ["configs", "crates/runner", "data"] {
        fs::create_dir_all(checkout.join(d)).unwrap();
    }
    for f in ["configs/cnn.toml", "data/digits.csv"] {
        fs::copy(root().join(f), checkout.join(f)).unwrap();
    }
    if Path::new("/usr/share/datasets/mnist").is_dir() {
        panic!("/usr/share/datasets/mnist exists: the offline fallback cannot be observed");
    }
    let expected = if Path::new(FASHION).is_dir() {
        "fashion-mnist"
    } else {
        "digits"
    };
    let out = tmp.path().join("cnn");
    let started = std::time::Instant::now();
    let o = kiln()
        .current_dir(&checkout)
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

/// `n` pictures per class in `dir/<class>/NN.png`, each written by `save(class, picture, path)`.
fn class_folders(dir: &Path, classes: &[&str], n: u32, save: impl Fn(usize, u32, &Path)) {
    for (k, class) in classes.iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..n {
            save(k, i, &dir.join(class).join(format!("{i:02}.png")));
        }
    }
}

/// `kiln train cnn` on the folder `dir` (batches of 16, and `sets`) into `out`; the
/// `dataset=…` override it used.
fn train_cnn_on_folder(dir: &Path, out: &Path, sets: &[&str]) -> String {
    let dataset = format!("dataset=\"folder:{}\"", path_str(dir));
    let mut args = vec![
        "train",
        "cnn",
        "--set",
        &dataset,
        "--set",
        "train.batch_size=16",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    args.extend(["--out", path_str(out)]);
    run_ok(&args);
    dataset
}

/// `dataset = "folder:DIR"`: a folder of the user's own PNGs, one sub-folder per class, of any
/// size: the CNN learns them, reports and predicts with the folder names as classes.
#[test]
fn a_folder_of_your_own_pngs_trains_and_predicts_with_class_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shapes");
    // Dark strokes on a light ground, 36-48 px, a little noise: bars across, bars down, crosses.
    let draw = |kind: usize, size: u32, seed: u32| {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        image::GrayImage::from_fn(size, size, |x, y| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let (mid, band) = (size / 2, size / 6);
            let across = y.abs_diff(mid) < band;
            let down = x.abs_diff(mid) < band;
            let ink = match kind {
                0 => across,
                1 => down,
                _ => across || down,
            };
            image::Luma([if ink { 30 } else { 220 } + (s % 20) as u8])
        })
    };
    class_folders(&dir, &["across", "down", "cross"], 40, |k, i, path| {
        draw(k, 36 + (i % 13), i * 7 + k as u32).save(path).unwrap()
    });
    let out = tmp.path().join("run");
    let dataset = train_cnn_on_folder(
        &dir,
        &out,
        &["train.epochs=8", "train.validation_split=0.1"],
    );
    let s = summary(&out);
    let acc = s["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "folder accuracy {acc}");
    assert_eq!(
        s["test_examples"], 24,
        "every fifth image of each class is test"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("CNN on shapes"), "{report}");
    let photo = tmp.path().join("mine.png");
    draw(1, 64, 99).save(&photo).unwrap();
    let r = run_ok(&["predict", path_str(&out), "--image", path_str(&photo)]);
    assert!(r.stdout.starts_with("down "), "{}", r.stdout);
    // A class folder without images is one line naming it.
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let r = run(&["train", "cnn", "--set", &dataset]);
    assert_clean_error(&r, "empty: class folder with no PNG or JPEG images");
}

/// Colour: two classes that differ only in hue — a red and a green disc of the same luma
/// (0.299·200 ≈ 0.587·102), so their grey versions are alike — on a noisy grey ground. The
/// folder is read as RGB, normalised per channel, and the CNN learns what grey could not.
#[test]
fn a_folder_of_colour_pngs_trains_on_three_channels() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hues");
    let draw = |rgb: [u8; 3], size: u32, seed: u32| {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        let (cx, cy, r) = (
            size / 2 + seed % 5,
            size / 2 - seed % 4,
            size / 4 + seed % 3,
        );
        image::RgbImage::from_fn(size, size, |x, y| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let noise = (s % 24) as u8;
            if x.abs_diff(cx).pow(2) + y.abs_diff(cy).pow(2) < r * r {
                image::Rgb(rgb.map(|v| v.saturating_add(noise)))
            } else {
                image::Rgb([60 + noise; 3])
            }
        })
    };
    let hues = [[0, 102, 0], [200, 0, 0]];
    class_folders(&dir, &["green", "red"], 30, |k, i, path| {
        draw(hues[k], 30 + (i % 11), i * 7 + k as u32)
            .save(path)
            .unwrap()
    });
    let out = tmp.path().join("run");
    let dataset = train_cnn_on_folder(&dir, &out, &["train.epochs=6"]);
    let s = summary(&out);
    let acc = s["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "colour folder accuracy {acc}");
    assert!(
        s["architecture"].as_str().unwrap().contains("3×28×28"),
        "{}",
        s["architecture"]
    );
    let pre: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("preprocessing.json")).unwrap())
            .unwrap();
    assert_eq!(pre["channels"], 3);
    assert_eq!(pre["mean"].as_array().unwrap().len(), 3, "{pre}");
    // Per channel: red is brighter in the first plane than in the second.
    assert!(pre["mean"][0].as_f64() > pre["mean"][1].as_f64(), "{pre}");
    assert!(out.join("misclassified.png").is_file());

    let photo = tmp.path().join("mine.png");
    draw([200, 0, 0], 50, 3).save(&photo).unwrap();
    let r = run_ok(&["predict", path_str(&out), "--image", path_str(&photo)]);
    assert!(r.stdout.starts_with("red "), "{}", r.stdout);
    // ONNX: three channels in, standardised per channel.
    run_ok(&["export", path_str(&out), "--format", "onnx"]);
    let g = kiln_core::onnx::read_graph(&std::fs::read(out.join("model.onnx")).unwrap()).unwrap();
    assert_eq!(g.initializer("normalise.mean"), Some(&[1, 3, 1, 1][..]));
    assert_eq!(g.initializer("blocks.0.conv.weight").unwrap()[1], 3);

    // Another size: 3 × 12 × 16 inputs to the MLP; the stored sizes kept, which differ here,
    // and a size for a data set that is not a folder are one line each.
    let small = tmp.path().join("small");
    run_ok(&[
        "train",
        "mlp",
        "--set",
        &dataset,
        "--set",
        "params.image_size=[12, 16]",
        "--set",
        "train.epochs=1",
        "--out",
        path_str(&small),
    ]);
    let arch = summary(&small)["architecture"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(arch.starts_with("MLP 576-"), "{arch}");
    let r = run(&[
        "train",
        "cnn",
        "--set",
        &dataset,
        "--set",
        "params.resize=false",
    ]);
    assert_clean_error(
        &r,
        "with params.resize = false every image needs the same size",
    );
    let r = run(&[
        "train",
        "cnn",
        "--set",
        "dataset=\"digits\"",
        "--set",
        "params.image_size=32",
    ]);
    assert_clean_error(&r, "params.image_size: only folder data sets");

    // The generative families and a grey ResNet say so in one line.
    let r = run(&["train", "vae", "--set", &dataset]);
    assert_clean_error(&r, "colour images (3 channels)");
    let r = run(&[
        "train",
        "resnet",
        "--set",
        &dataset,
        "--set",
        "params.net.in_channels=1",
    ]);
    assert_clean_error(&r, "in_channels: 1 but the images have 3 channels");
}

/// `dataset = "csv:FILE"`: images as CSV rows (a `label` column and one per pixel, the layout
/// of Kaggle's Sign Language MNIST) — here the shipped 8×8 digits file itself.
#[test]
fn images_as_csv_rows_train_with_their_labels_as_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    run_ok(&[
        "train",
        "mlp",
        "--set",
        "dataset=\"csv:data/digits.csv\"",
        "--set",
        "train.epochs=6",
        "--set",
        "train.validation_split=0.1",
        "--out",
        path_str(&out),
    ]);
    let s = summary(&out);
    let acc = s["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.85, "accuracy {acc}");
    assert_eq!(s["test_examples"], 359, "every fifth of the 1797 rows");
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "label,a,b,c\n1,0,0,0\n").unwrap();
    let r = run(&[
        "train",
        "mlp",
        "--set",
        &format!("dataset=\"csv:{}\"", path_str(&bad)),
    ]);
    assert_clean_error(&r, "bad.csv: 3 pixel columns are not a square image");
}
