//! End to end: deep Q-learning through the `kiln` CLI — CartPole learns, resumes exactly after
//! `kill -9` and plays; the trading agent reports its portfolio beside buy and hold; bad price
//! files are one-line errors.

mod common;

use std::fs;

use common::*;

const CARTPOLE: &[&str] = &[
    "dqn-cartpole",
    "--set",
    "train.epochs=12",
    "--set",
    "params.episodes_per_round=10",
    "--set",
    "params.warmup=500",
    "--set",
    "params.eval_episodes=3",
];

#[test]
fn cartpole_learns_resumes_exactly_and_plays() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let mut args = vec!["train"];
    args.extend_from_slice(CARTPOLE);
    args.extend(["--out", path_str(&a)]);
    run_ok(&args);
    let s = summary(&a);
    assert_eq!(s["episodes"].as_u64(), Some(120));
    assert!(a.join("reward.png").is_file() && a.join("report.md").is_file());
    // Learning: the last rounds' training returns are well above the first (random) ones.
    let text = fs::read_to_string(a.join("metrics.csv")).unwrap();
    let returns: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    let first = returns[0];
    let best_late = returns[8..].iter().cloned().fold(0.0, f64::max);
    assert!(
        best_late > 3.0 * first && best_late > 60.0,
        "returns per round: {returns:?}"
    );

    let r = run_ok(&["play", path_str(&a), "--episodes", "3", "--seed", "5"]);
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.starts_with("episode "))
            .count(),
        3,
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stdout,
        run_ok(&["play", path_str(&a), "--episodes", "3", "--seed", "5"]).stdout
    );

    // kill -9 after the first checkpoint, then resume: the same metrics as uninterrupted.
    let b = tmp.path().join("b");
    killed_and_resumed(&b, CARTPOLE);
    assert_eq!(
        fs::read_to_string(a.join("metrics.csv")).unwrap(),
        fs::read_to_string(b.join("metrics.csv")).unwrap()
    );
}

#[test]
fn trading_agent_reports_buy_and_hold_and_bad_files_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t");
    run_ok(&[
        "train",
        "dqn-trading",
        "--set",
        "train.epochs=2",
        "--set",
        "params.env.synthetic.days=120",
        "--set",
        "params.warmup=100",
        "--out",
        path_str(&out),
    ]);
    let s = summary(&out);
    let t = &s["trading"];
    assert!(t["final_value"].as_f64().unwrap() > 0.0);
    assert!(t["buy_and_hold"].as_f64().unwrap() > 0.0);
    let r = run_ok(&["play", path_str(&out), "--episodes", "1"]);
    assert!(r.stdout.contains("vs buy and hold"), "{}", r.stdout);

    // A user's price file (Date is not read): trains and reports.
    let prices = tmp.path().join("prices.csv");
    let mut text = String::from("Volume,Date,Close,Open,High,Low,Adj Close\n");
    for i in 0..90 {
        let p = 100.0 + 10.0 * (i as f64 / 7.0).sin() + i as f64 * 0.1;
        text.push_str(&format!(
            "{},2021-{:03},{p},{p},{},{},{p}\n",
            1000 + i,
            i,
            p + 1.0,
            p - 1.0
        ));
    }
    fs::write(&prices, text).unwrap();
    let user = tmp.path().join("user");
    let set = format!(
        "params.env={{ kind = \"trading\", csv = \"{}\" }}",
        path_str(&prices)
    );
    run_ok(&[
        "train",
        "dqn-trading",
        "--set",
        &set,
        "--set",
        "train.epochs=1",
        "--set",
        "params.warmup=100",
        "--out",
        path_str(&user),
    ]);
    let t = &summary(&user)["trading"];
    assert_eq!(t["test_days"].as_u64(), Some(27), "{t}");
    assert!(t["buy_and_hold"].as_f64().unwrap() > 0.0);

    let csv = tmp.path().join("spy.csv");
    fs::write(
        &csv,
        "Date,Open,High,Low,Close,Adj Close,Volume\n2020-01-02,1,1,1,1,1,10\n",
    )
    .unwrap();
    let set = format!(
        "params.env={{ kind = \"trading\", csv = \"{}\" }}",
        path_str(&csv)
    );
    let r = run(&[
        "train",
        "dqn-trading",
        "--set",
        &set,
        "--out",
        path_str(&tmp.path().join("u")),
    ]);
    assert_clean_error(&r, "spy.csv: 1 rows of prices, fewer than one window");
    fs::write(
        &csv,
        "Date,Open,High,Low,Close,Volume\n2020-01-02,1,1,1,1,10\n",
    )
    .unwrap();
    let r = run(&[
        "train",
        "dqn-trading",
        "--set",
        &set,
        "--out",
        path_str(&tmp.path().join("v")),
    ]);
    assert_clean_error(&r, "spy.csv: no column \"Adj Close\"");
}

/// `train.lr_decay` scales the DQN's learning rate every round: the first round is the same
/// to the byte as without decay, the second is not.
#[test]
fn dqn_follows_train_lr_decay() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = |decay: &str| {
        let out = tmp.path().join(format!("dqn-{decay}"));
        let decay = format!("train.lr_decay={decay}");
        run_ok(&[
            "train",
            "dqn-cartpole",
            "--out",
            path_str(&out),
            "--set",
            "train.epochs=2",
            "--set",
            "params.episodes_per_round=5",
            "--set",
            "params.warmup=64",
            "--set",
            "params.eval_episodes=2",
            "--set",
            &decay,
        ]);
        metrics_rows(&out)
    };
    let (constant, halved) = (rows("1.0"), rows("0.5"));
    assert_eq!(constant[0], halved[0]);
    assert_ne!(constant[1], halved[1]);
}

/// `train.schedule` drives the DQN's optimizer per round, like every family's: a cosine
/// schedule over three rounds gives η, η/2, 0 in the `lr` column.
#[test]
fn dqn_follows_a_cosine_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dqn");
    run_ok(&[
        "train",
        "dqn-cartpole",
        "--out",
        path_str(&out),
        "--set",
        "train.epochs=3",
        "--set",
        "params.episodes_per_round=3",
        "--set",
        "params.warmup=32",
        "--set",
        "params.eval_episodes=1",
        "--set",
        "train.schedule=\"cosine\"",
    ]);
    let lr = metrics_column(&out, "lr");
    let base = lr[0];
    assert!(
        base > 0.0 && (lr[1] - base / 2.0).abs() < 1e-12 && lr[2].abs() < 1e-12,
        "{lr:?}"
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("round,"), "{csv}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["training"]["unit"], "round");
    assert_eq!(s["training"]["units_run"], 3);
}
