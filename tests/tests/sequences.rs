//! End to end: the recurrent families (rnn-series, rnn-classify, char-rnn with an LSTM, a GRU
//! or a Transformer) through the `kiln` CLI on small data written by the tests (seconds per
//! run): learning, baselines, text sampling, exact resume after `kill -9`, and one-line errors
//! for bad input.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn metrics(dir: &Path) -> String {
    fs::read_to_string(dir.join("metrics.csv")).unwrap()
}

/// A small forecasting run on a shorter synthetic series.
const SERIES: &[&str] = &[
    "lstm-series",
    "--set",
    "params.data.synthetic.length=1200",
    "--set",
    "train.epochs=12",
    "--set",
    "params.window=30",
    "--set",
    "params.net.hidden=16",
];

#[test]
fn series_forecaster_beats_the_baselines_and_predicts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("series");
    let mut args = vec!["train"];
    args.extend_from_slice(SERIES);
    args.extend_from_slice(&["--out", path_str(&out)]);
    run_ok(&args);
    let s = summary(&out);
    let t = &s["test"];
    let mse = t["mse"].as_f64().unwrap();
    let last = t["last_value_mse"].as_f64().unwrap();
    let avg = t["moving_average_mse"].as_f64().unwrap();
    let sigma2 = t["noise_variance"].as_f64().unwrap();
    assert!((sigma2 - 0.04).abs() < 1e-12);
    assert!(
        mse < 0.8 * last && mse < avg,
        "LSTM {mse}, last value {last}, average {avg}"
    );
    assert!(mse > 0.8 * sigma2, "below the noise floor: {mse}");
    for f in [
        "forecast.png",
        "loss.png",
        "report.md",
        "config.toml",
        "info.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("last-value baseline MSE") && report.contains("σ²"));

    // predict: the next value after a given series (comma-separated or a CSV column).
    let values: Vec<String> = (0..30)
        .map(|t| format!("{:.4}", (std::f64::consts::TAU * t as f64 / 50.0).sin()))
        .collect();
    let r = run_ok(&["predict", path_str(&out), "--input", &values.join(",")]);
    let next: f64 = r
        .stdout
        .trim()
        .strip_prefix("t+1: ")
        .unwrap()
        .parse()
        .unwrap();
    let want = (std::f64::consts::TAU * 30.0 / 50.0).sin();
    assert!((next - want).abs() < 0.4, "forecast {next}, sine {want}");
    let csv = tmp.path().join("short.csv");
    fs::write(&csv, "value\n1\n2\n3\n").unwrap();
    let r = run(&["predict", path_str(&out), "--input", path_str(&csv)]);
    assert_clean_error(
        &r,
        "short.csv: the series has 3 values, fewer than the model's window of 30",
    );
}

#[test]
fn sequence_classifier_needs_the_order_and_learns_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("careers");
    run_ok(&[
        "train",
        "lstm-homerun",
        "--set",
        "params.data.careers.sequences=2500",
        "--set",
        "params.net.hidden=32",
        "--set",
        "train.epochs=15",
        "--set",
        "train.patience=0",
        "--out",
        path_str(&out),
    ]);
    let s = summary(&out);
    let acc = s["test_accuracy"].as_f64().unwrap();
    let bag = s["bag_of_features_baseline_accuracy"].as_f64().unwrap();
    assert!(bag < 0.32, "order-blind baseline {bag}");
    assert!(acc > 0.6, "LSTM accuracy {acc}");
    assert!(out.join("confusion.png").is_file());
    let report = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("order-blind") && report.contains("| true \\ predicted |"));
}

fn write_text(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("fox.txt");
    fs::write(
        &p,
        "the quick brown fox jumps over the lazy dog.\n".repeat(1500),
    )
    .unwrap();
    p
}

fn char_args<'a>(text: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "char-rnn",
        "--set",
        &format!("params.data.text=\"{text}\""),
        "--set",
        "params.data.exclude=[]",
        "--set",
        "params.window=24",
        "--set",
        "params.net.embedding=16",
        "--set",
        "params.net.hidden=48",
        "--set",
        "params.net.layers=1",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.learning_rate=0.01",
        "--set",
        "train.validation_split=0.1",
        "--set",
        "params.test_fraction=0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for e in extra {
        v.push(e.to_string());
    }
    v
}

#[test]
fn char_rnn_learns_a_pattern_samples_deterministically_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let text = write_text(tmp.path());
    let a = tmp.path().join("a");
    let args = char_args(path_str(&text), &["--set", "train.epochs=4"]);
    let mut train: Vec<&str> = vec!["train"];
    train.extend(args.iter().map(String::as_str));
    let mut with_out = train.clone();
    with_out.extend(["--out", path_str(&a)]);
    run_ok(&with_out);

    let s = summary(&a);
    let entropy = s["unigram_entropy_bits"].as_f64().unwrap();
    let bpc = s["test"]["bits_per_char"].as_f64().unwrap();
    assert!(entropy > 3.0, "{entropy}");
    // The text is one sentence repeated: after a few characters the next one is certain.
    assert!(
        bpc < 0.1 * entropy,
        "held-out {bpc} bits/char vs unigram {entropy}"
    );
    for f in [
        "vocab.json",
        "sample.txt",
        "bpc.png",
        "loss.png",
        "report.md",
    ] {
        assert!(a.join(f).is_file(), "{f} missing");
    }

    // Sampling: continues the prompt, the same for a seed, different across seeds.
    let sample = |seed: &str| {
        run_ok(&[
            "sample",
            path_str(&a),
            "--prompt",
            "the quick ",
            "--len",
            "60",
            "--temperature",
            "1.0",
            "--seed",
            seed,
        ])
        .stdout
    };
    let one = sample("1");
    assert!(one.starts_with("the quick brown fox"), "{one}");
    assert_eq!(one, sample("1"));
    let hot = |seed: &str| {
        run_ok(&[
            "sample",
            path_str(&a),
            "--len",
            "200",
            "--temperature",
            "5",
            "--seed",
            seed,
        ])
        .stdout
    };
    assert_ne!(hot("1"), hot("2"));
    let r = run(&[
        "sample",
        path_str(&a),
        "--prompt",
        "the 狐 fox!",
        "--len",
        "5",
    ]);
    assert_clean_error(&r, "--prompt: 2 character(s) not in the model's vocabulary");
    assert!(
        r.stderr.contains("'狐'") && r.stderr.contains("'!'"),
        "{}",
        r.stderr
    );
    // The image generators' options are refused by name.
    let r = run(&["sample", path_str(&a), "--class", "3"]);
    assert_clean_error(
        &r,
        "--truncation, --judge and --class: for image generators",
    );

    // kill -9 after the first checkpoint, resume: the same metrics as uninterrupted (GRU).
    let gru = char_args(
        path_str(&text),
        &[
            "--set",
            "train.epochs=3",
            "--set",
            "params.net.cell=\"gru\"",
        ],
    );
    let gru: Vec<&str> = gru.iter().map(String::as_str).collect();
    let b = tmp.path().join("b");
    let mut straight = vec!["train"];
    straight.extend(&gru);
    straight.extend(["--out", path_str(&b)]);
    run_ok(&straight);
    let c = tmp.path().join("c");
    killed_and_resumed(&c, &gru);
    assert_eq!(metrics(&b), metrics(&c));

    // The run's vocabulary no longer matches its checkpoint: one line, naming the file.
    let vocab = a.join("vocab.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&vocab).unwrap()).unwrap();
    v["chars"].as_array_mut().unwrap().pop();
    fs::write(&vocab, v.to_string()).unwrap();
    let r = run(&["sample", path_str(&a), "--len", "5"]);
    assert_clean_error(&r, "model.bpk");
    assert!(r.stderr.contains("vocab.json lists"), "{}", r.stderr);
}

/// The Transformer on the same pipeline: learns the sentence, samples like the LSTM (the
/// same for a seed), a prompt longer than its context works, and resume after kill -9 is exact.
#[test]
fn char_transformer_learns_samples_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let text = write_text(tmp.path());
    let mut args = char_args(
        path_str(&text),
        &[
            "--set",
            "params.net.embedding=32",
            "--set",
            "params.net.hidden=64",
            "--set",
            "params.net.layers=2",
            "--set",
            "params.net.heads=4",
            "--set",
            "train.learning_rate=0.003",
            "--set",
            "train.epochs=3",
        ],
    );
    args[0] = "char-transformer".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = tmp.path().join("a");
    let mut train = vec!["train"];
    train.extend(&args);
    train.extend(["--out", path_str(&a)]);
    run_ok(&train);
    let s = summary(&a);
    let entropy = s["unigram_entropy_bits"].as_f64().unwrap();
    let bpc = s["test"]["bits_per_char"].as_f64().unwrap();
    assert!(
        bpc < 0.1 * entropy,
        "held-out {bpc} bits/char vs unigram {entropy}"
    );
    assert!(
        s["architecture"]
            .as_str()
            .unwrap()
            .contains("causal self-attention"),
        "{}",
        s["architecture"]
    );

    let sample = |prompt: &str, seed: &str| {
        run_ok(&[
            "sample",
            path_str(&a),
            "--prompt",
            prompt,
            "--len",
            "60",
            "--seed",
            seed,
        ])
        .stdout
    };
    let one = sample("the quick ", "1");
    assert!(one.starts_with("the quick brown fox"), "{one}");
    assert_eq!(one, sample("the quick ", "1"));
    // Longer than the 24-character context: the model conditions on its last characters.
    let long = "the lazy dog. ".repeat(10) + "the quick ";
    let out = sample(&long, "1");
    assert!(out.starts_with(&(long.clone() + "brown fox")), "{out}");

    let b = tmp.path().join("b");
    killed_and_resumed(&b, &args);
    assert_eq!(metrics(&a), metrics(&b));
}

#[test]
fn recurrent_bad_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, "%\n\n%\n").unwrap();
    let args = char_args(
        path_str(&empty),
        &["--out", path_str(&tmp.path().join("e"))],
    );
    let mut v = vec!["train"];
    v.extend(args.iter().map(String::as_str));
    assert_clean_error(&run(&v), "empty.txt: params.data.text: no text");

    let bad = tmp.path().join("latin1.txt");
    fs::write(&bad, b"caf\xe9 au lait\n").unwrap();
    let args = char_args(path_str(&bad), &["--out", path_str(&tmp.path().join("f"))]);
    let mut v = vec!["train"];
    v.extend(args.iter().map(String::as_str));
    assert_clean_error(
        &run(&v),
        "latin1.txt: not UTF-8 text: byte 0xe9 at byte offset 3",
    );

    let short = tmp.path().join("short.csv");
    fs::write(&short, "day,price\n1,10\n2,11\n3,12\n").unwrap();
    let csv_args = |file: &Path, out: &str| {
        vec![
            "train".to_string(),
            "lstm-series".into(),
            "--out".into(),
            path_str(&tmp.path().join(out)).into(),
            "--set".into(),
            format!(
                "params.data={{ csv = \"{}\", column = \"price\" }}",
                path_str(file)
            ),
        ]
    };
    let a = csv_args(&short, "g");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    assert_clean_error(
        &run(&a),
        "short.csv: params.window: the series has 3 values, fewer than window 50",
    );

    let text = tmp.path().join("text.csv");
    fs::write(&text, "day,price\n1,10\n2,n/a\n").unwrap();
    let a = csv_args(&text, "h");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    assert_clean_error(
        &run(&a),
        "text.csv: line 3, column \"price\": not a number: \"n/a\"",
    );

    // Unknown keys are errors, as in every config.
    let r = run(&["train", "char-rnn", "--set", "params.net.hiden=3"]);
    assert_clean_error(&r, "hiden");
}
