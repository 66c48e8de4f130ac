//! `kiln export`: a run's final weights as safetensors — the PyTorch twin's names (and linear
//! weights transposed to PyTorch's [out, in]) for the CNN, Burn's module paths otherwise — read
//! back and compared with `model.bpk` value for value.

mod common;

use kiln_core::RunDir;
use kiln_core::export::{NamedTensor, Values, read_safetensors, read_weights};

use common::*;

/// The exported `file` holds every tensor of `run`'s `model.bpk` under its Burn name, value
/// for value, and nothing else.
fn assert_burn_names(file: &std::path::Path, run: &std::path::Path) {
    let file = read_safetensors(file).unwrap();
    let burn = read_weights(&RunDir::open(run).unwrap()).unwrap();
    assert_eq!(file.len(), burn.len(), "{:?}", file.keys());
    for (name, shape, values) in &burn {
        assert_eq!(file[name], (shape.clone(), values.clone()), "{name}");
    }
}

#[test]
fn cnn_exports_the_pytorch_twins_names_and_every_value() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cnn");
    let mut args = vec!["train"];
    args.extend(DIGITS_CNN);
    args.extend(["--set", "train.epochs=1", "--out", path_str(&out)]);
    run_ok(&args);
    let printed = run_ok(&["export", path_str(&out)]).stdout;
    assert_eq!(printed.trim(), path_str(&out.join("model.safetensors")));
    let file = read_safetensors(&out.join("model.safetensors")).unwrap();
    let burn = read_weights(&RunDir::open(&out).unwrap()).unwrap();
    assert_eq!(file.len(), burn.len(), "{:?}", file.keys());
    // configs/cnn.toml: conv [32, 64] with batch norm, dropout, dense [128] with dropout: the
    // twin's nn.Sequential puts the layers with weights at 0, 1, 4, 5, 10 and 13.
    let get = |name: &str| burn.iter().find(|(n, ..)| n == name).unwrap();
    for (torch, burn_name) in [
        ("0.weight", "blocks.0.conv.weight"),
        ("1.weight", "blocks.0.norm.gamma"),
        ("5.running_var", "blocks.1.norm.running_var"),
        ("13.bias", "output.bias"),
    ] {
        let (_, shape, values) = get(burn_name);
        assert_eq!(file[torch], (shape.clone(), values.clone()), "{torch}");
    }
    let (_, shape, values) = get("dense.0.weight");
    let (r, c) = (shape[0], shape[1]);
    let (tshape, tvalues) = &file["10.weight"];
    assert_eq!(tshape, &vec![c, r]);
    for i in 0..r {
        for j in 0..c {
            assert_eq!(tvalues[j * r + i], values[i * c + j]);
        }
    }
    // ONNX: the inference graph, read back without Python (onnxruntime checks the numbers:
    // scripts/check_onnx.py).
    let printed = run_ok(&["export", path_str(&out), "--format", "onnx"]).stdout;
    assert_eq!(printed.trim(), path_str(&out.join("model.onnx")));
    let g = kiln_core::onnx::read_graph(&std::fs::read(out.join("model.onnx")).unwrap()).unwrap();
    assert_eq!(g.opset, 17);
    assert!(g.connected, "{g:?}");
    assert_eq!(g.inputs, ["pixels"]);
    assert_eq!(g.outputs, ["probabilities"]);
    assert_eq!(
        g.ops,
        [
            "Sub",
            "Div",
            "Conv",
            "BatchNormalization",
            "MaxPool",
            "Relu",
            "Conv",
            "BatchNormalization",
            "MaxPool",
            "Relu",
            "Flatten",
            "Gemm",
            "Relu",
            "Gemm",
            "Softmax"
        ]
    );
    let dims = |name: &str| g.initializer(name).unwrap().to_vec();
    assert_eq!(dims("blocks.0.conv.weight"), [32, 1, 3, 3]);
    assert_eq!(dims("blocks.1.norm.running_var"), [64]);
    assert_eq!(dims("output.weight"), [128, 10]);

    // --burn-names: Burn's paths, the values untouched.
    let plain = tmp.path().join("plain.safetensors");
    run_ok(&[
        "export",
        path_str(&out),
        "--burn-names",
        "--out",
        path_str(&plain),
    ]);
    assert_burn_names(&plain, &out);

    // `kiln predict` on the exported file answers as on the run, after the run is gone:
    // the file carries the config and the preprocessing, and either naming reads back.
    let png = tmp.path().join("bar.png");
    image::GrayImage::from_fn(24, 24, |x, _| {
        image::Luma([if (9..15).contains(&x) { 255 } else { 0 }])
    })
    .save(&png)
    .unwrap();
    let on_run = run_ok(&["predict", path_str(&out), "--image", path_str(&png)]).stdout;
    assert_eq!(on_run.trim().split(", ").count(), 3, "{on_run}");
    let shipped = tmp.path().join("shipped.safetensors");
    std::fs::copy(out.join("model.safetensors"), &shipped).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    for file in [&shipped, &plain] {
        let r = run_ok(&["predict", path_str(file), "--image", path_str(&png)]);
        assert_eq!(r.stdout, on_run, "{}", file.display());
    }
    // Not kiln's export, ONNX, a missing file: one line each.
    let foreign = root().join("tests/fixtures/resnet_bottleneck.safetensors");
    assert_clean_error(
        &run(&["predict", path_str(&foreign), "--image", path_str(&png)]),
        "no kiln.config in its metadata",
    );
    let onnx = tmp.path().join("model.onnx");
    std::fs::write(&onnx, b"onnx").unwrap();
    assert_clean_error(
        &run(&["predict", path_str(&onnx), "--image", path_str(&png)]),
        "kiln reads back its safetensors export, not ONNX",
    );
    assert_clean_error(
        &run(&["predict", path_str(&out), "--image", path_str(&png)]),
        "no such run directory or exported model file",
    );
}

#[test]
fn a_vae_exports_pytorch_examples_names_others_burns_and_a_bad_run_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vae");
    let mut args = vec!["train"];
    args.extend(DIGITS_VAE);
    args.extend(["--set", "train.epochs=1", "--out", path_str(&out)]);
    run_ok(&args);
    run_ok(&["export", path_str(&out)]);
    let file = read_safetensors(&out.join("model.safetensors")).unwrap();
    let burn = read_weights(&RunDir::open(&out).unwrap()).unwrap();
    assert_eq!(file.len(), burn.len());
    // PyTorch's examples/vae (scripts/reference/pytorch_vae.py): fc1, fc21 (μ), fc22
    // (log σ²), fc3, fc4; linear weights [out, in].
    let get = |name: &str| burn.iter().find(|(n, ..)| n == name).unwrap();
    for (torch, burn_name) in [("fc21.bias", "mu.bias"), ("fc4.bias", "dec_out.bias")] {
        let (_, shape, values) = get(burn_name);
        assert_eq!(file[torch], (shape.clone(), values.clone()), "{torch}");
    }
    let (_, shape, values) = get("log_var.weight");
    let (r, c) = (shape[0], shape[1]);
    assert_eq!(file["fc22.weight"].0, [c, r]);
    assert_eq!(
        file["fc22.weight"].1[1], values[c],
        "[0][1] of [out, in] is [1][0] of [in, out]"
    );
    // ONNX: the decoder, codes in, images out (onnxruntime checks the numbers:
    // scripts/check_onnx.py).
    run_ok(&["export", path_str(&out), "--format", "onnx"]);
    let g = kiln_core::onnx::read_graph(&std::fs::read(out.join("model.onnx")).unwrap()).unwrap();
    assert!(g.connected, "{g:?}");
    assert_eq!(
        (g.inputs.clone(), g.outputs.clone()),
        (vec!["z".to_string()], vec!["images".to_string()])
    );
    assert_eq!(
        g.ops,
        ["Gemm", "Relu", "Gemm", "Sigmoid", "Reshape", "Identity"]
    );
    let sample = read_safetensors(&out.join("model.sample.safetensors")).unwrap();
    assert_eq!(sample["z"].0, [8, 2]);
    assert_eq!(sample["images"].0, [8, 1, 8, 8]);
    assert!(sample["images"].1.iter().all(|v| (0.0..=1.0).contains(v)));
    let linear = tmp.path().join("linear");
    run_ok(&[
        "train",
        "linear",
        "--set",
        "train.epochs=2",
        "--out",
        path_str(&linear),
    ]);
    // No twin: Burn's module paths, values untouched.
    run_ok(&["export", path_str(&linear)]);
    assert_burn_names(&linear.join("model.safetensors"), &linear);
    assert_clean_error(
        &run(&["export", path_str(&linear), "--format", "onnx"]),
        "linear runs have no ONNX export",
    );
    // `kiln sample` on the exported file draws what it draws from the run; the grid goes
    // beside the file.
    let from_run = tmp.path().join("from-run.png");
    let args = ["--n", "4", "--seed", "5"];
    let mut cmd = vec!["sample", path_str(&out), "--out", path_str(&from_run)];
    cmd.extend(args);
    run_ok(&cmd);
    let file = out.join("model.safetensors");
    let mut cmd = vec!["sample", path_str(&file)];
    cmd.extend(args);
    let printed = run_ok(&cmd).stdout;
    let beside = out.join("model-samples-seed-5.png");
    assert_eq!(printed.trim(), path_str(&beside));
    assert_eq!(
        std::fs::read(&beside).unwrap(),
        std::fs::read(&from_run).unwrap()
    );
    std::fs::write(out.join("model.bpk"), b"not weights").unwrap();
    assert_clean_error(
        &run(&["export", path_str(&out)]),
        "model.bpk: not a Burn weights file",
    );
    assert_clean_error(
        &run(&["export", path_str(tmp.path())]),
        "not a kiln run directory",
    );
}

/// A GAN's generator and a DQN's Q-network as ONNX graphs: noise in, images out; states in,
/// Q-values out — each with its sample inputs and kiln's outputs beside it.
#[test]
fn a_generator_and_a_q_network_export_as_onnx() {
    let tmp = tempfile::tempdir().unwrap();
    let gan = tmp.path().join("gan");
    let mut args = vec!["train", "gan"];
    args.extend(DIGITS_MLP_GAN);
    args.extend(["--set", "train.epochs=1", "--out", path_str(&gan)]);
    run_ok(&args);
    run_ok(&["export", path_str(&gan), "--format", "onnx"]);
    let g = kiln_core::onnx::read_graph(&std::fs::read(gan.join("model.onnx")).unwrap()).unwrap();
    assert!(g.connected, "{g:?}");
    assert_eq!(g.inputs, ["z"]);
    assert_eq!(g.outputs, ["images"]);
    assert_eq!(
        g.ops,
        [
            "Gemm",
            "LeakyRelu",
            "Gemm",
            "LeakyRelu",
            "Gemm",
            "Tanh",
            "Add",
            "Mul",
            "Reshape",
            "Identity"
        ]
    );
    let sample = read_safetensors(&gan.join("model.sample.safetensors")).unwrap();
    assert_eq!(sample["z"].0, [8, 16]);
    assert_eq!(sample["images"].0, [8, 1, 8, 8]);

    let dqn = tmp.path().join("dqn");
    let mut args = vec!["train"];
    args.extend(QUICK_DQN);
    args.extend(["--out", path_str(&dqn)]);
    run_ok(&args);
    run_ok(&["export", path_str(&dqn), "--format", "onnx"]);
    let g = kiln_core::onnx::read_graph(&std::fs::read(dqn.join("model.onnx")).unwrap()).unwrap();
    assert!(g.connected, "{g:?}");
    assert_eq!(g.inputs, ["state"]);
    assert_eq!(g.outputs, ["q_values"]);
    assert_eq!(
        g.ops.iter().filter(|o| *o == "Gemm").count(),
        3,
        "{:?}",
        g.ops
    );
    let sample = read_safetensors(&dqn.join("model.sample.safetensors")).unwrap();
    assert_eq!(sample["state"].0, [8, 4]);
    assert_eq!(sample["q_values"].0, [8, 2]);
    // Exported weights play as the run does.
    run_ok(&["export", path_str(&dqn)]);
    let from_run = run_ok(&["play", path_str(&dqn), "--episodes", "2"]).stdout;
    let file = dqn.join("model.safetensors");
    assert_eq!(
        run_ok(&["play", path_str(&file), "--episodes", "2"]).stdout,
        from_run
    );
}

/// Trains a tiny character model (`config` with `sets`) on a repeated sentence, exports it,
/// and returns the run, the file's tensors by name and the run's Burn tensors.
fn tiny_char_export(
    tmp: &std::path::Path,
    config: &str,
    sets: &[&str],
) -> (
    std::path::PathBuf,
    std::collections::BTreeMap<String, Values>,
    Vec<NamedTensor>,
) {
    let text = tmp.join("fox.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let out = tmp.join(config);
    let data = format!("params.data.text=\"{}\"", path_str(&text));
    let mut args = vec![
        "train",
        config,
        "--set",
        &data,
        "--set",
        "params.data.exclude=[]",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    args.extend(["--set", "train.epochs=1", "--out", path_str(&out)]);
    run_ok(&args);
    run_ok(&["export", path_str(&out)]);
    let file = read_safetensors(&out.join("model.safetensors")).unwrap();
    let burn = read_weights(&RunDir::open(&out).unwrap()).unwrap();
    (out, file, burn)
}

/// `kiln sample --top-k 1` (greedy) from a run or an exported file.
fn greedy(model: &std::path::Path) -> String {
    let args = [
        "sample",
        path_str(model),
        "--prompt",
        "the ",
        "--len",
        "40",
        "--top-k",
        "1",
    ];
    run_ok(&args).stdout
}

/// A character LSTM under `nn.LSTM`'s names: each layer's four gates stacked in
/// `weight_ih_l{k}` / `weight_hh_l{k}` / biases, i, f, g, o, linear weights as [out, in]; the
/// file samples the same greedy text as its run.
#[test]
fn a_char_lstm_exports_nn_lstm_stacked_gates() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "params.window=16",
        "params.net.hidden=12",
        "params.net.embedding=8",
        "params.net.layers=2",
    ];
    let (out, file, burn) = tiny_char_export(tmp.path(), "char-rnn", &sets);
    let get = |name: &str| burn.iter().find(|(n, ..)| n == name).unwrap().clone();
    let mut keys: Vec<&String> = file.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), 3 + 2 * 4, "{keys:?}");
    assert_eq!(file["rnn.weight_ih_l0"].0, [48, 8]);
    assert_eq!(file["rnn.weight_hh_l1"].0, [48, 12]);
    assert_eq!(file["rnn.bias_ih_l1"].0, [48]);
    // Row 12 + 3 of weight_ih_l0 is the forget gate's (the second block) unit 3: column 3 of
    // Burn's [inputs, hidden] forget_gate.input_transform.weight.
    let (_, _, forget) = get("stack.layers.0.lstm.forget_gate.input_transform.weight");
    let row: Vec<f32> = (0..8).map(|i| forget[i * 12 + 3]).collect();
    assert_eq!(file["rnn.weight_ih_l0"].1[15 * 8..16 * 8], row[..]);
    let (_, _, bias) = get("stack.layers.1.lstm.output_gate.hidden_transform.bias");
    assert_eq!(file["rnn.bias_hh_l1"].1[36..], bias[..]);
    assert_eq!(greedy(&out.join("model.safetensors")), greedy(&out));
}

/// A character GRU under `nn.GRU`'s names (gates r, z, n stacked) and a character Transformer
/// under the twin's (`nn.MultiheadAttention`'s `in_proj_weight` stacks the query, key and
/// value projections; layer norms' γ, β as `weight`, `bias`): every Burn tensor is in the file
/// once, and each file samples its run's greedy text.
#[test]
fn a_char_gru_and_transformer_export_pytorchs_names() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "params.window=16",
        "params.net.hidden=10",
        "params.net.embedding=6",
    ];
    let (out, file, burn) = tiny_char_export(tmp.path(), "char-gru", &sets);
    let get =
        |burn: &[NamedTensor], name: &str| burn.iter().find(|(n, ..)| n == name).unwrap().2.clone();
    let layers = 2; // char-gru's
    assert_eq!(file.len(), 3 + layers * 4, "{:?}", file.keys());
    assert_eq!(file["rnn.weight_ih_l0"].0, [30, 6]);
    assert_eq!(file["rnn.weight_hh_l1"].0, [30, 10]);
    // Row 10 + 4 of weight_hh_l1 is the update gate's (z, the second block) unit 4.
    let update = get(
        &burn,
        "stack.layers.1.gru.update_gate.hidden_transform.weight",
    );
    let row: Vec<f32> = (0..10).map(|i| update[i * 10 + 4]).collect();
    assert_eq!(file["rnn.weight_hh_l1"].1[14 * 10..15 * 10], row[..]);
    let new = get(&burn, "stack.layers.0.gru.new_gate.input_transform.bias");
    assert_eq!(file["rnn.bias_ih_l0"].1[20..], new[..]);
    assert_eq!(greedy(&out.join("model.safetensors")), greedy(&out));

    let sets = [
        "params.window=16",
        "params.net.hidden=16",
        "params.net.embedding=8",
        "params.net.layers=2",
        "params.net.heads=2",
    ];
    let (out, file, burn) = tiny_char_export(tmp.path(), "char-transformer", &sets);
    // Every Burn tensor once: per block the query, key and value weights and biases (6) are
    // two stacked tensors.
    assert_eq!(burn.len() - file.len(), 2 * (6 - 2), "{:?}", file.keys());
    for name in [
        "emb.weight",
        "pos.weight",
        "ln.weight",
        "ln.bias",
        "out.weight",
        "out.bias",
    ] {
        assert!(file.contains_key(name), "{name}");
    }
    assert_eq!(file["blocks.1.att.in_proj_weight"].0, [24, 8]);
    assert_eq!(file["blocks.1.mlp.0.weight"].0, [16, 8]);
    // Row 8 + 5 of in_proj_weight is the key projection's output 5: column 5 of Burn's key
    // weight [in, out].
    let key = get(&burn, "blocks.1.attention.key.weight");
    let row: Vec<f32> = (0..8).map(|i| key[i * 8 + 5]).collect();
    assert_eq!(
        file["blocks.1.att.in_proj_weight"].1[13 * 8..14 * 8],
        row[..]
    );
    let gamma = get(&burn, "blocks.0.norm_2.gamma");
    assert_eq!(file["blocks.0.ln2.weight"].1, gamma);
    assert_eq!(greedy(&out.join("model.safetensors")), greedy(&out));
}
