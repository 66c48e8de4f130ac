//! The one lifecycle every family shares: whatever trains, `summary.json` has the same
//! `training` keys (from the engine), a headline whose figures are numbers of the summary,
//! and `report.md`, `metrics.csv` and the `lr` column; `kiln list --runs` shows the headline.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::*;

/// One short run of every family (and both sequence-model kinds of `char-rnn`).
fn short_runs(text: &str) -> Vec<(&'static str, Vec<String>)> {
    let v = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let text = format!("params.data.text=\"{text}\"");
    vec![
        ("linear", v(&["linear", "--set", "train.epochs=3"])),
        ("logistic", v(&["logistic", "--set", "train.epochs=3"])),
        (
            "mlp",
            v(&["mlp", "--set", "dataset=digits", "--set", "train.epochs=1"]),
        ),
        ("cnn", {
            let mut a = v(&DIGITS_CNN);
            a.extend(v(&["--set", "train.epochs=1"]));
            a
        }),
        (
            "resnet",
            v(&[
                "resnet",
                "--set",
                "dataset=digits",
                "--set",
                "params.net.width=4",
                "--set",
                "train.epochs=1",
            ]),
        ),
        ("vae", {
            let mut a = v(&DIGITS_VAE);
            a.extend(v(&["--set", "train.epochs=1"]));
            a
        }),
        ("gan", {
            let mut a = v(&["gan", "--set", "train.epochs=1"]);
            a.extend(v(&DIGITS_MLP_GAN));
            a
        }),
        (
            "rnn-series",
            v(&[
                "lstm-series",
                "--set",
                "params.data.synthetic.length=400",
                "--set",
                "train.epochs=1",
                "--set",
                "params.net.hidden=8",
            ]),
        ),
        (
            "rnn-classify",
            v(&[
                "lstm-homerun",
                "--set",
                "params.data.careers.sequences=300",
                "--set",
                "train.epochs=1",
                "--set",
                "params.net.hidden=8",
                "--set",
                "params.baseline_steps=0",
            ]),
        ),
        (
            "char-rnn",
            v(&[
                "char-rnn",
                "--set",
                &text,
                "--set",
                "params.data.exclude=[]",
                "--set",
                "params.window=16",
                "--set",
                "params.net.hidden=16",
                "--set",
                "params.net.layers=1",
                "--set",
                "train.epochs=1",
                "--set",
                "train.validation_split=0.1",
                "--set",
                "params.test_fraction=0.1",
            ]),
        ),
        ("dqn", v(&QUICK_DQN)),
    ]
}

#[test]
fn every_family_leaves_the_same_training_section_a_headline_and_an_lr_column() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("fox.txt");
    fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog.\n".repeat(300),
    )
    .unwrap();
    let runs = tmp.path().join("runs");
    let mut keys: Option<BTreeSet<String>> = None;
    for (family, args) in short_runs(path_str(&text)) {
        let out = runs.join(family);
        let mut full: Vec<&str> = vec!["train"];
        full.extend(args.iter().map(String::as_str));
        full.extend(["--out", path_str(&out)]);
        run_ok(&full);
        let s = summary(&out);
        assert_eq!(s["model"], family, "{s}");
        let training = s["training"]
            .as_object()
            .unwrap_or_else(|| panic!("{family}: {s}"));
        let these: BTreeSet<String> = training.keys().cloned().collect();
        match &keys {
            Some(k) => assert_eq!(&these, k, "{family}: training keys differ"),
            None => keys = Some(these),
        }
        assert!(training["units_run"].as_u64().unwrap() >= 1, "{family}");
        assert!(training["seconds"].as_f64().unwrap() > 0.0, "{family}");
        let headline = s["headline"].as_array().unwrap();
        assert!(
            !headline.is_empty() || family == "gan",
            "{family}: no headline"
        );
        for f in headline {
            let path = f["metric"].as_str().unwrap();
            let at = path.split('.').fold(&s, |v, k| &v[k]);
            assert_eq!(at, &f["value"], "{family}: headline {path}");
            let report = fs::read_to_string(out.join("report.md")).unwrap();
            assert!(
                report.contains(f["text"].as_str().unwrap()),
                "{family}: {report}"
            );
        }
        let header = fs::read_to_string(out.join("metrics.csv")).unwrap();
        let header = header.lines().next().unwrap().to_string();
        assert!(header.contains(",lr"), "{family}: {header}");
    }
    // `kiln list --runs` prints each run's first headline figure.
    let listed = run_ok(&["list", "--runs", "--root", path_str(&runs)]).stdout;
    assert!(
        listed.contains("test accuracy") && listed.contains("test bits per character"),
        "{listed}"
    );
}

/// Every results table — README.md's and the model cards' — is what `kiln docs` renders from
/// docs/results.toml: a figure changed in one place only fails here.
#[test]
fn results_tables_are_rendered_from_results_toml() {
    let r = run_ok(&["docs", "--check"]);
    assert!(
        r.stdout.contains("README.md") && r.stdout.contains("docs/models/cnn.md"),
        "{}",
        r.stdout
    );
}
