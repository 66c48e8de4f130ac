//! Bad input is one clear error line and exit code 1: never a panic.

mod common;

use std::fs;

use common::*;

fn config_file(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("bad.toml");
    fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn malformed_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path(), "model = \"linear\"\n[train\nepochs = 3\n");
    let r = run(&[
        "train",
        "x",
        "--config",
        &cfg,
        "--out",
        path_str(&tmp.path().join("r")),
    ]);
    assert_clean_error(&r, "bad.toml: line 2");
    assert!(
        !tmp.path().join("r").exists(),
        "no run directory for a bad config"
    );
}

#[test]
fn unknown_key() {
    let r = run(&["train", "linear", "--set", "train.epohcs=3"]);
    assert_clean_error(
        &r,
        "configs/linear.toml: train.epohcs: unknown field `epohcs`",
    );
    let r = run(&["train", "logistic", "--set", "params.colour=1"]);
    assert_clean_error(&r, "params.colour: unknown field `colour`");
}

#[test]
fn wrong_value_type() {
    let r = run(&["train", "linear", "--set", "train.epochs=\"ten\""]);
    assert_clean_error(&r, "train.epochs: invalid type: string \"ten\"");
}

#[test]
fn unknown_model_and_family() {
    let r = run(&["train", "transformer"]);
    assert_clean_error(&r, "unknown model \"transformer\"");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_file(tmp.path(), "model = \"svm\"\n[params]\n");
    let r = run(&["train", "x", "--config", &cfg]);
    assert_clean_error(&r, "model: unknown model family \"svm\"");
}

#[test]
fn missing_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let r = run(&[
        "train",
        "linear",
        "--set",
        "params.data=data/nope.csv",
        "--out",
        path_str(&tmp.path().join("r")),
    ]);
    assert_clean_error(&r, "data/nope.csv: data file not found");
    // Failed before its first epoch: no empty run directory is left behind.
    assert!(!tmp.path().join("r").exists());
}

#[test]
fn non_numeric_cell() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("iris.csv");
    let mut text = fs::read_to_string(root().join("data/iris.csv")).unwrap();
    text = text.replacen("5.1,3.5,1.4,0.2", "5.1,abc,1.4,0.2", 1);
    fs::write(&csv, text).unwrap();
    let data = format!("params.data=\"{}\"", csv.display());
    let r = run(&[
        "train",
        "logistic",
        "--set",
        &data,
        "--out",
        path_str(&tmp.path().join("r")),
    ]);
    assert_clean_error(&r, "line 2, column \"sepal_width\": not a number: \"abc\"");
}

#[test]
fn predict_with_wrong_number_of_features() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    run_ok(&[
        "train",
        "logistic",
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=2",
    ]);
    let r = run(&["predict", path_str(&out), "--input", "1,2,3"]);
    assert_clean_error(&r, "expected 2 values (sepal_length, sepal_width), got 3");
    let r = run(&["predict", path_str(&out), "--input", "1,x"]);
    assert_clean_error(&r, "not a number: \"x\"");
}

#[test]
fn resume_or_eval_of_something_that_is_not_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let r = run(&["resume", path_str(tmp.path())]);
    assert_clean_error(&r, "not a kiln run directory");
    let r = run(&["eval", path_str(&tmp.path().join("missing"))]);
    assert_clean_error(&r, "no such run directory");
}

#[test]
fn corrupt_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    run_ok(&[
        "train",
        "logistic",
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=2",
    ]);
    fs::write(out.join("model.bpk"), b"not a model").unwrap();
    let r = run(&["predict", path_str(&out), "--input", "5,3"]);
    assert_clean_error(&r, "model.bpk");
}

#[test]
fn backend_not_compiled_in_names_the_feature() {
    let list = run_ok(&["list"]).stdout;
    assert!(list.contains("flex     usable (CPU)"), "{list}");
    let missing: Vec<&str> = ["wgpu", "cuda"]
        .into_iter()
        .filter(|b| list.contains(&format!("{b:<8} not compiled in")))
        .collect();
    // CI's builds compile in at most wgpu, so cuda at least is checked there.
    for b in missing {
        let r = run(&["train", "linear", "--backend", b]);
        assert_clean_error(&r, &format!("--features {b}"));
    }
    let r = run(&["train", "linear", "--backend", "tpu"]);
    assert_clean_error(&r, "unknown backend \"tpu\"");
}

#[test]
fn list_shows_families_configs_and_backends() {
    let r = run_ok(&["list"]);
    for needle in [
        "linear",
        "logistic",
        "logistic-multiclass",
        "linear-simple",
        "flex",
        "ndarray",
        "wgpu",
        "cuda",
    ] {
        assert!(
            r.stdout.contains(needle),
            "kiln list lacks {needle}:\n{}",
            r.stdout
        );
    }
}

#[test]
fn bad_network_params_name_the_field() {
    let r = run(&["train", "cnn", "--set", "params.net.dense_dropout=1.5"]);
    assert_clean_error(
        &r,
        "configs/cnn.toml: params.net: dense_dropout: must be in [0, 1), got 1.5",
    );
    let r = run(&["train", "cnn", "--set", "params.net.kernel=4"]);
    assert_clean_error(&r, "configs/cnn.toml: params.net: kernel: must be odd");
}

/// `--devices` (train.devices) names devices of the backend: the CPU backends have one, the
/// families with their own loop train on one, and a device is not listed twice — each a
/// line naming the config and the field, before any run directory exists.
#[test]
fn devices_the_backend_does_not_have() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    let r = run(&["train", "mlp", "--devices", "0,1", "--out", path_str(&out)]);
    assert_clean_error(
        &r,
        "configs/mlp.toml: train.devices = [0, 1]: backend \"flex\" has one device (0)",
    );
    assert!(!out.exists(), "no run directory for a bad device list");
    let r = run(&["train", "gan", "--set", "train.devices=[0,1]"]);
    assert_clean_error(
        &r,
        "configs/gan.toml: train.devices: [0, 1]: the gan family trains on one device",
    );
    let r = run(&["train", "linear", "--backend", "cuda", "--devices", "1,1"]);
    assert_clean_error(&r, "train.devices = [1, 1]: device 1 is listed twice");
}
