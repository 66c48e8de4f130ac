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

/// Sizes a user types are bounded: one line naming the flag and the limit, before any work.
#[test]
fn user_sized_requests_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = path_str(tmp.path());
    for (args, needle) in [
        (
            vec!["sample", run_dir, "--n", "100000000"],
            "--n: at most 10000, got 100000000",
        ),
        (
            vec!["sample", run_dir, "--n", "0"],
            "--n: must be at least 1",
        ),
        (
            vec!["sample", run_dir, "--len", "5000000"],
            "--len: at most 100000, got 5000000",
        ),
        (
            vec!["play", run_dir, "--episodes", "1000000"],
            "--episodes: at most 10000, got 1000000",
        ),
        (
            vec!["sweep", "logistic", "--seeds", "20000"],
            "--grid/--seeds: at most 10000 runs in one sweep, got 20000",
        ),
        (
            vec![
                "sweep",
                "logistic",
                "--grid",
                "train.learning_rate=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                "--grid",
                "train.epochs=1,2,3,4,5,6,7,8,9,10",
                "--seeds",
                "101",
            ],
            "at most 10000 runs in one sweep, got 10100",
        ),
    ] {
        let r = run(&args);
        assert_clean_error(&r, needle);
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// One bad `--set` (or flag) per line, for every family's config, data and CLI verb: each is
/// exit code 1 with one error line that names the file or flag and the field, and leaves no
/// run directory. Offline (`KILN_MIRRORS` unreachable), so no case downloads anything.
#[test]
fn every_family_and_verb_rejects_bad_input_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let file = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let two = file("two.csv", b"a,b\n1,2\n");
    let one = file("one.txt", b"x\n");
    let empty = file("empty.txt", b"");
    let not_utf8 = file("latin1.txt", b"\xff\xfe caf\xe9");
    let zero = file(
        "zero.csv",
        format!(
            "Date,Open,High,Low,Close,Adj Close,Volume\n{}",
            (0..30)
                .map(|i| format!(
                    "2020-01-{:02},1,2,0.5,1.5,{},9\n",
                    i + 1,
                    if i == 7 { 0 } else { 1 }
                ))
                .collect::<String>()
        )
        .as_bytes(),
    );
    let lower = file(
        "lower.csv",
        b"date,open,high,low,close,adj close,volume\n2020-01-01,1,1,1,1,1,1\n",
    );
    let missing = d.join("missing.csv").to_str().unwrap().to_string();
    let q = |p: &str| format!("{p:?}");
    let env_of = |p: &str| format!("params.env={{ kind = \"trading\", csv = {p:?} }}");
    let text_of = |p: &str| format!("params.data.text={p:?}");
    #[rustfmt::skip]
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["linear".into(), "train.epochs=0".into()], "configs/linear.toml: train.epochs: must be at least 1"),
        (vec!["linear".into(), "train.learning_rate=-1".into()], "train.learning_rate: must be a positive number, got -1"),
        (vec!["linear".into(), "train.learning_rate=nan".into()], "train.learning_rate: must be a positive number, got NaN"),
        (vec!["linear".into(), "train.lr_decay=0".into()], "train.lr_decay: must be in (0, 1], got 0"),
        (vec!["linear".into(), "train.lr_decay=1.5".into()], "train.lr_decay: must be in (0, 1], got 1.5"),
        (vec!["linear".into(), "train.schedule=\"cosin\"".into()], "train.schedule: unknown variant `cosin`"),
        (vec!["linear".into(), "train.schedule={kind=\"step\",steps=3}".into()], "train.schedule.steps: unknown field `steps`"),
        (vec!["linear".into(), "train.schedule={kind=\"step\",gamma=2}".into()], "train.schedule.gamma: must be in (0, 1], got 2"),
        (vec!["linear".into(), "train.schedule=\"cosine\"".into(), "train.lr_decay=0.9".into()], "train.lr_decay: is a shorthand for schedule"),
        (vec!["gan".into(), "dataset=\"digits\"".into(), "train.patience=2".into()], "train.monitor: train.patience follows a metric, and this model has no default one"),
        (vec!["linear".into(), "train.batch_size=-3".into()], "train.batch_size: invalid value: integer `-3`"),
        (vec!["linear".into(), "train.validation_split=0.95".into()], "train.validation_split: must be in [0, 0.9), got 0.95"),
        (vec!["linear".into(), "train.max_minutes=0".into()], "train.max_minutes: must be a positive number, got 0"),
        (vec!["linear".into(), "train.stop_at=inf".into()], "train.stop_at: must be a finite number, got inf"),
        (vec!["linear".into(), "train.optimizer.name=\"lbfgs\"".into()], "train.optimizer.name: unknown variant `lbfgs`"),
        (vec!["linear".into(), "seed=-1".into()], "configs/linear.toml: seed: invalid value: integer `-1`"),
        (vec!["linear".into(), "backend=\"tpu\"".into()], "configs/linear.toml: backend: unknown variant `tpu`"),
        (vec!["linear".into(), format!("params.data={}", q(&missing))], "missing.csv: data file not found"),
        (vec!["linear".into(), format!("params.data={}", q(&two))], "two.csv: no column \"CRIM\" (columns: a, b)"),
        (vec!["logistic".into(), format!("params.data={}", q(&one))], "one.txt: no data rows"),
        (vec!["logistic".into(), "train.monitor=\"val_los\"".into()], "train.monitor: no metric \"val_los\""),
        (vec!["logistic-multiclass".into(), "train.mode=\"up\"".into()], "train.mode: unknown variant `up`"),
        (vec!["mlp".into(), "params.net.hidden=[0]".into()], "configs/mlp.toml: params.net: hidden: layer widths must be at least 1"),
        (vec!["mlp".into(), "params.net.activation=\"relu6\"".into()], "params.net.activation: unknown variant `relu6`"),
        (vec!["mlp".into(), "dataset=\"cifar\"".into()], "configs/mlp.toml: dataset: unknown dataset \"cifar\""),
        (vec!["xor".into(), "params.net.hidden=[2,-2]".into()], "configs/xor.toml: params.net.hidden[1]: invalid value: integer `-2`"),
        (vec!["cnn".into(), "params.net.conv=[]".into()], "configs/cnn.toml: params.net: conv: need at least one block"),
        (vec!["cnn".into(), "params.net.kernel=0".into()], "params.net: kernel: must be odd (3, 5, …), got 0"),
        (vec!["cnn".into(), "params.net.padding=\"full\"".into()], "params.net.padding: unknown variant `full`"),
        (vec!["cnn".into(), "params.net.dropout=1.5".into()], "params.net: dropout: must be in [0, 1), got 1.5"),
        (vec!["cnn".into(), "params.augment.shift=-1".into()], "params.augment.shift: invalid value: integer `-1`"),
        (vec!["cnn".into(), "train.devices=[0,0]".into()], "train.devices = [0, 0]: device 0 is listed twice"),
        (vec!["autoencoder".into(), "params.net.latent=0".into()], "configs/autoencoder.toml: params.net.latent: must be at least 1"),
        (vec!["vae".into(), "params.net.latent=0".into()], "configs/vae.toml: params.net.latent: must be at least 1"),
        (vec!["vae-2d".into(), "params.beta=-1".into()], "configs/vae-2d.toml: params.beta: unknown field `beta`"),
        (vec!["gan".into(), "params.net.latent=0".into()], "configs/gan.toml: params.net.latent: must be at least 1"),
        (vec!["gan".into(), "params.net.kind=\"vit\"".into()], "params.net.kind: unknown variant `vit`"),
        (vec!["gan".into(), "params.label_smoothing=2".into()], "params.label_smoothing: must be in [0, 0.5), got 2"),
        (vec!["gan".into(), "params.ema=1.5".into()], "params.ema: must be in [0, 1) (0 = off), got 1.5"),
        (vec!["gan".into(), "train.devices=[0,1]".into()], "train.devices: [0, 1]: the gan family trains on one device"),
        (vec!["gan-conditional".into(), "params.net.conditional=\"both\"".into()], "params.net.conditional: unknown variant `both`"),
        (vec!["gan".into(), "train.validation_split=0.3".into()], "configs/gan.toml: train.validation_split: 0.3: the gan family holds out no validation data"),
        (vec!["dqn-cartpole".into(), "train.validation_split=0.5".into()], "configs/dqn-cartpole.toml: train.validation_split: 0.5: the dqn family holds out no validation data"),
        (vec!["char-rnn".into(), text_of(&missing)], "missing.csv: params.data.text: cannot read"),
        (vec!["char-rnn".into(), text_of(&empty)], "empty.txt: params.data.text: no text to learn from"),
        (vec!["char-rnn".into(), text_of(&not_utf8)], "latin1.txt: not UTF-8 text: byte 0xff at byte offset 0"),
        (vec!["char-rnn".into(), "params.net.hidden=0".into()], "configs/char-rnn.toml: params.net.hidden: must be at least 1"),
        (vec!["char-gru".into(), "params.net.layers=0".into()], "configs/char-gru.toml: params.net.layers: must be at least 1"),
        (vec!["char-transformer".into(), "params.net.heads=3".into()], "params.net.heads: 3 heads must divide embedding = 128"),
        (vec!["char-rnn".into(), "params.net.kind=\"transformer\"".into()], "params.net.kind: Transformer is the char-transformer family (model = \"char-transformer\")"),
        (vec!["lstm-series".into(), "params.window=0".into()], "configs/lstm-series.toml: params.window: must be at least 1"),
        (vec!["lstm-series".into(), format!("params.data.csv={}", q(&two))], "params.data: give either synthetic = { … } or csv = \"FILE\" with column = \"NAME\""),
        (vec!["lstm-homerun".into(), "params.data.steps=0".into()], "params.data.steps: unknown field `steps`"),
        (vec!["dqn-cartpole".into(), "params.gamma=1.5".into()], "configs/dqn-cartpole.toml: params.gamma: must be in [0, 1]"),
        (vec!["dqn-cartpole".into(), "params.episodes_per_round=0".into()], "params.episodes_per_round: must be at least 1"),
        (vec!["dqn-cartpole".into(), "params.epsilon.start=2".into()], "params.epsilon: start and end in [0, 1]"),
        (vec!["dqn-trading".into(), "params.env={ kind = \"moon\" }".into()], "params.env.kind: \"moon\": must be \"cartpole\" or \"trading\""),
        (vec!["dqn-trading".into(), env_of(&two)], "two.csv: no column \"Open\" (columns: a, b)"),
        (vec!["dqn-trading".into(), env_of(&zero)], "zero.csv: line 9, column \"Adj Close\": a price must be positive, got 0"),
        (vec!["dqn-trading".into(), env_of(&lower)], "lower.csv: no column \"Open\" (did you mean \"open\"? names match exactly"),
    ];
    for (i, (case, needle)) in cases.iter().enumerate() {
        let out = d.join(format!("run-{i}"));
        let mut args = vec!["train", case[0].as_str(), "--out", path_str(&out)];
        for set in &case[1..] {
            args.extend(["--set", set.as_str()]);
        }
        let r = run_env(&args, &[("KILN_MIRRORS", "http://127.0.0.1:9/")]);
        assert_clean_error(&r, needle);
        assert!(!out.exists(), "{args:?} left a run directory");
    }

    let nodir = d.join("nodir");
    let nodir = path_str(&nodir);
    let not_run = path_str(d);
    #[rustfmt::skip]
    let verbs: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "nosuchconfig"], "unknown model \"nosuchconfig\": no configs/nosuchconfig.toml"),
        (vec!["train", "linear", "--config", &missing], "missing.csv: cannot read config"),
        (vec!["train", "linear", "--set", "nokey"], "--set \"nokey\": expected key=value"),
        (vec!["train", "linear", "--set", "=3"], "--set: empty key segment"),
        (vec!["train", "linear", "--set", "train.epochs="], "train.epochs: invalid type: string \"\""),
        (vec!["train", "cnn", "--backend", "tpu"], "unknown backend \"tpu\""),
        (vec!["predict", nodir, "--input", "1,2"], "nodir: no such run directory"),
        (vec!["predict", not_run, "--image", &one], "not a kiln run directory (no config.toml"),
        (vec!["sample", nodir], "nodir: no such run directory"),
        (vec!["play", nodir], "nodir: no such run directory"),
        (vec!["resume", nodir], "nodir: no such run directory"),
        (vec!["eval", not_run], "not a kiln run directory (no config.toml"),
        (vec!["bench", "nosuchconfig"], "unknown model \"nosuchconfig\""),
        (vec!["bench", "cnn", "--backend", "tpu"], "unknown backend \"tpu\""),
        (vec!["sweep", "linear", "--grid", "train.epochs"], "--grid train.epochs: expected KEY=V1,V2,…"),
        (vec!["sweep", "linear", "--grid", "seed=1,2"], "--grid seed: use --seeds N for seeds"),
        (vec!["sweep", "linear", "--grid", "train.epochs=1", "--grid", "train.epochs=2"], "--grid train.epochs: the key is swept twice"),
        (vec!["sweep", "linear", "--seeds", "0"], "--seeds: must be at least 1"),
        (vec!["sweep", "--status", nodir], "nodir/sweep.toml: cannot read (is this a sweep directory?)"),
        (vec!["sweep", "--collect", not_run], "sweep.toml: cannot read (is this a sweep directory?)"),
    ];
    for (args, needle) in &verbs {
        assert_clean_error(&run(args), needle);
    }
    assert!(cases.len() + verbs.len() >= 70);
}
