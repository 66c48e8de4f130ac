//! Weights in and transfer learning: a ResNet trained on the digits, exported with
//! torchvision's names, loaded back as `params.pretrained` with the backbone frozen and a new
//! head; and the one-line errors of a bad `pretrained`, `freeze` or `head`.

mod common;

use std::collections::BTreeMap;

use kiln_core::RunDir;
use kiln_core::export::{read_safetensors, read_weights};

use common::*;

const DIGITS_RESNET: [&str; 7] = [
    "resnet",
    "--set",
    "dataset=digits",
    "--set",
    "params.net.width=8",
    "--set",
    "train.batch_size=32",
];

fn weights(dir: &std::path::Path) -> BTreeMap<String, Vec<f32>> {
    read_weights(&RunDir::open(dir).unwrap())
        .unwrap()
        .into_iter()
        .map(|(n, _, v)| (n, v))
        .collect()
}

#[test]
fn a_resnet_learns_and_its_exported_weights_start_a_frozen_fine_tune() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let mut args = DIGITS_RESNET.to_vec();
    args.insert(0, "train");
    args.extend(["--set", "train.epochs=4", "--out", path_str(&base)]);
    run_ok(&args);
    let acc = summary(&base)["test"]["accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.85,
        "a small ResNet on the digits: test accuracy {acc}"
    );

    // Out with torchvision's names, and back in.
    run_ok(&["export", path_str(&base)]);
    let file = base.join("model.safetensors");
    let exported = read_safetensors(&file).unwrap();
    assert!(exported.contains_key("layer2.0.downsample.0.weight"));
    assert!(exported.contains_key("fc.weight"));

    // And as ONNX: residual additions and the global average pool in the graph.
    run_ok(&["export", path_str(&base), "--format", "onnx"]);
    let g = kiln_core::onnx::read_graph(&std::fs::read(base.join("model.onnx")).unwrap()).unwrap();
    assert!(g.connected);
    assert_eq!(
        g.ops.iter().filter(|o| *o == "Add").count(),
        4,
        "{:?}",
        g.ops
    );
    assert!(g.ops.contains(&"GlobalAveragePool".to_string()));
    assert!(
        g.initializers
            .iter()
            .any(|(n, d)| n == "layer2.0.downsample.0.weight" && d == &[16, 8, 1, 1])
    );

    // The backbone frozen, a new head: after an epoch every backbone tensor (running
    // averages included) is the exported one, bit for bit, and the head has learned.
    let tuned = tmp.path().join("tuned");
    let mut args = DIGITS_RESNET.to_vec();
    args.insert(0, "train");
    let pretrained = format!("params.pretrained=\"{}\"", path_str(&file));
    args.extend([
        "--set",
        &pretrained,
        "--set",
        "params.freeze=\"backbone\"",
        "--set",
        "params.head={ classes = 10 }",
        "--set",
        "params.train_limit=100",
        "--set",
        "train.epochs=5",
        "--set",
        "train.learning_rate=0.01",
        "--out",
        path_str(&tuned),
    ]);
    let r = run_ok(&args);
    assert!(
        r.stderr
            .contains("tensors loaded, a new classifier for 10 classes"),
        "{}",
        r.stderr
    );
    let before = weights(&base);
    let after = weights(&tuned);
    for (name, values) in &after {
        if name.starts_with("fc.") {
            assert_ne!(values, &before[name], "{name} was trained");
        } else {
            assert_eq!(values, &before[name], "{name} is frozen");
        }
    }
    // From 100 labelled images, a new head on a frozen backbone that already knows the
    // digits learns in five epochs what the whole network from scratch cannot.
    let scratch = tmp.path().join("scratch");
    let mut args = DIGITS_RESNET.to_vec();
    args.insert(0, "train");
    args.extend([
        "--set",
        "params.train_limit=100",
        "--set",
        "train.epochs=5",
        "--set",
        "train.learning_rate=0.01",
        "--out",
        path_str(&scratch),
    ]);
    run_ok(&args);
    let test = |d: &std::path::Path| summary(d)["test"]["accuracy"].as_f64().unwrap();
    let (t, s) = (test(&tuned), test(&scratch));
    eprintln!("test accuracy from 100 labels: fine-tuned {t}, from scratch {s}");
    assert!(t > s + 0.1, "fine-tuned {t} vs from scratch {s}");

    // freeze = ["layer1"] only: conv1 trains, layer1 does not.
    let part = tmp.path().join("part");
    let mut args = DIGITS_RESNET.to_vec();
    args.insert(0, "train");
    args.extend([
        "--set",
        &pretrained,
        "--set",
        "params.freeze=[\"layer1\"]",
        "--set",
        "train.epochs=1",
        "--out",
        path_str(&part),
    ]);
    run_ok(&args);
    let part = weights(&part);
    assert_eq!(
        part["layer1.0.conv1.weight"],
        before["layer1.0.conv1.weight"]
    );
    assert_ne!(part["conv1.weight"], before["conv1.weight"]);
}

#[test]
fn bad_pretrained_freeze_and_head_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.pth");
    let set_missing = format!("params.pretrained=\"{}\"", path_str(&missing));
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--set", &set_missing],
            "missing.pth: params.pretrained: no such file".into(),
        ),
        (
            vec!["--set", "params.freeze=[\"layer9\"]"],
            "params.freeze: no layer \"layer9\" in this network".into(),
        ),
        (
            vec!["--set", "params.head={ classes = 26 }"],
            "params.head.classes: 26 but the data set has 10 classes".into(),
        ),
    ];
    let fixture = root().join("tests/fixtures/resnet_basic.pth");
    let set_fixture = format!("params.pretrained=\"{}\"", path_str(&fixture));
    let mut cases = cases;
    // torchvision's layout but another network (ImageNet stem, RGB): named tensor, one line.
    cases.push((
        vec!["--set", &set_fixture],
        "resnet_basic.pth: params.pretrained: tensor conv1.weight is [8, 3, 7, 7] in the file, the network needs [8, 1, 3, 3]".into(),
    ));
    let out = tmp.path().join("run");
    for (extra, needle) in cases {
        let mut args = vec!["train"];
        args.extend(DIGITS_RESNET);
        args.extend(extra);
        args.extend(["--set", "train.epochs=1", "--out", path_str(&out)]);
        assert_clean_error(&run(&args), &needle);
    }
}
