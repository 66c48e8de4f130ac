use super::*;
use burn::tensor::{Distribution, TensorData};
use kiln_core::data::to_vec;
use std::path::PathBuf;

fn params(
    block: BlockKind,
    layers: [usize; 4],
    width: usize,
    stem: Stem,
    in_channels: usize,
) -> ResNetParams {
    ResNetParams {
        block,
        layers,
        width,
        stem,
        in_channels,
    }
}

/// torchvision's parameter counts: ResNet-18 11,689,512 and ResNet-50 25,557,032 (ImageNet
/// stem, RGB, 1,000 classes). Burn's `num_params` also counts batch norm's running means and
/// variances, which PyTorch keeps as buffers: 9,600 and 53,120 values
/// (`sum(b.numel() for n, b in m.named_buffers() if "running" in n)`).
#[test]
fn parameter_counts_match_torchvision() {
    let d = Device::flex();
    let r18 = params(BlockKind::Basic, [2, 2, 2, 2], 64, Stem::Imagenet, 3);
    let r50 = params(BlockKind::Bottleneck, [3, 4, 6, 3], 64, Stem::Imagenet, 3);
    assert_eq!(
        ResNet::build(&r18, 224, 224, 1000, &d)
            .unwrap()
            .num_params(),
        11_689_512 + 9_600
    );
    assert_eq!(
        ResNet::build(&r50, 224, 224, 1000, &d)
            .unwrap()
            .num_params(),
        25_557_032 + 53_120
    );
}

/// Shapes through a small network: the small stem keeps 28×28, the stages give 28, 14, 7, 4,
/// and a projection shortcut exists exactly where a block changes size or channels.
#[test]
fn shapes_and_shortcuts() {
    let d = Device::flex();
    let p = params(BlockKind::Basic, [2, 1, 1, 1], 8, Stem::Small, 1);
    let net = ResNet::build(&p, 28, 28, 10, &d).unwrap();
    let x = Tensor::<4>::random([3, 1, 28, 28], Distribution::Normal(0.0, 1.0), &d);
    assert_eq!(ImageNet::forward(&net, x.clone()).dims(), [3, 10]);
    assert_eq!(net.features(x).dims(), [3, 64]);
    assert!(net.layer1.iter().all(|b| b.downsample.is_none()));
    assert!(
        [&net.layer2, &net.layer3, &net.layer4]
            .iter()
            .all(|s| s[0].downsample.is_some())
    );
    // Bottleneck: even the first block of layer1 projects (width → 4·width channels).
    let p = params(BlockKind::Bottleneck, [2, 1, 1, 1], 4, Stem::Small, 1);
    let net = ResNet::build(&p, 28, 28, 10, &d).unwrap();
    assert!(net.layer1[0].downsample.is_some() && net.layer1[1].downsample.is_none());
    assert_eq!(net.fc.weight.dims(), [4 * 8 * 4, 10]);
    // A grey picture into an RGB network is repeated over the three channels.
    let rgb = ResNet::build(
        &params(BlockKind::Basic, [1, 1, 1, 1], 4, Stem::Small, 3),
        16,
        16,
        5,
        &d,
    )
    .unwrap();
    let grey = Tensor::<4>::random([2, 1, 16, 16], Distribution::Normal(0.0, 1.0), &d);
    let same = to_vec(rgb.valid().forward(grey.clone()));
    let repeated = to_vec(rgb.valid().forward(grey.repeat_dim(1, 3)));
    assert_eq!(same, repeated);
}

#[test]
fn rejects_what_does_not_fit() {
    let d = Device::flex();
    let zero = params(BlockKind::Basic, [2, 0, 2, 2], 8, Stem::Small, 1);
    assert!(
        ResNet::build(&zero, 28, 28, 10, &d)
            .unwrap_err()
            .starts_with("layers:")
    );
    let tiny = params(BlockKind::Basic, [1, 1, 1, 1], 8, Stem::Imagenet, 1);
    assert!(ResNet::build(&tiny, 8, 8, 10, &d).is_ok());
    assert!(
        ResNet::build(&tiny, 0, 8, 10, &d)
            .unwrap_err()
            .starts_with("stem:")
    );
}

/// Every Burn tensor has a torch name, and the names are torchvision's.
#[test]
fn torch_names_cover_every_tensor() {
    let d = Device::flex();
    for p in [
        params(BlockKind::Basic, [2, 1, 1, 1], 8, Stem::Imagenet, 3),
        params(BlockKind::Bottleneck, [1, 2, 1, 1], 4, Stem::Small, 1),
    ] {
        let net = ResNet::build(&p, 32, 32, 10, &d).unwrap();
        let names = ResNet::torch_names(&p).unwrap();
        let burn = kiln_core::import::tensor_names(&net);
        let mut mapped: Vec<&String> = names.names.keys().collect();
        let mut have: Vec<&String> = burn.iter().collect();
        mapped.sort();
        have.sort();
        assert_eq!(mapped, have);
        let torch: Vec<&str> = names.names.values().map(|t| t.name.as_str()).collect();
        assert!(torch.contains(&"layer2.0.downsample.0.weight"));
        assert!(torch.contains(&"layer2.0.downsample.1.running_var"));
        assert!(torch.contains(&"bn1.weight"));
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../tests/fixtures")
        .join(name)
}

/// The fixture's input and torchvision's output for it (scripts/reference/resnet_fixture.py).
fn fixture_io(which: &str, d: &Device) -> (Tensor<4>, Vec<f32>) {
    let io = kiln_core::export::read_safetensors(&fixture("resnet_io.safetensors")).unwrap();
    let (shape, x) = io[&format!("{which}.input")].clone();
    let (_, y) = io[&format!("{which}.output")].clone();
    let x = Tensor::<4>::from_data(
        TensorData::new(x, [shape[0], shape[1], shape[2], shape[3]]),
        d,
    );
    (x, y)
}

/// kiln's forward pass (evaluation mode: batch norm from the running averages) on weights
/// PyTorch wrote in torchvision's layout reproduces PyTorch's output to 1e-5: basic blocks
/// from a `.pth` state dict, bottleneck blocks from safetensors.
#[test]
fn torchvision_weights_give_torchvisions_outputs() {
    let d = Device::flex();
    for (which, file, p) in [
        (
            "basic",
            "resnet_basic.pth",
            params(BlockKind::Basic, [2, 1, 1, 1], 8, Stem::Imagenet, 3),
        ),
        (
            "bottleneck",
            "resnet_bottleneck.safetensors",
            params(BlockKind::Bottleneck, [1, 2, 1, 1], 4, Stem::Imagenet, 3),
        ),
    ] {
        let mut net = ResNet::build(&p, 32, 32, 10, &d).unwrap();
        let names = ResNet::torch_names(&p).unwrap();
        let loaded = kiln_core::import::load(&mut net, &fixture(file), Some(&names), &[]).unwrap();
        assert_eq!(loaded.applied, names.names.len(), "{which}");
        let (x, want) = fixture_io(which, &d);
        let got = to_vec(ImageNet::forward(&net.valid(), x));
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{which}: max |kiln − PyTorch| = {worst}");
    }
}

/// A file for another network is a one-line error naming the first tensor that does not fit.
#[test]
fn mismatched_weights_are_named() {
    let d = Device::flex();
    // Twice as wide: the stem's weight has another shape.
    let wide = params(BlockKind::Basic, [2, 1, 1, 1], 16, Stem::Imagenet, 3);
    let mut net = ResNet::build(&wide, 32, 32, 10, &d).unwrap();
    let names = ResNet::torch_names(&wide).unwrap();
    let e = kiln_core::import::load(&mut net, &fixture("resnet_basic.pth"), Some(&names), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv1.weight is [8, 3, 7, 7] in the file, the network needs [16, 3, 7, 7]"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    // Fewer blocks: layer1.1 of the file has no place.
    let short = params(BlockKind::Basic, [1, 1, 1, 1], 8, Stem::Imagenet, 3);
    let mut net = ResNet::build(&short, 32, 32, 10, &d).unwrap();
    let names = ResNet::torch_names(&short).unwrap();
    let e = kiln_core::import::load(&mut net, &fixture("resnet_basic.pth"), Some(&names), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer1.1.") && e.contains("no place in the network"),
        "{e}"
    );
    // More blocks: the file lacks some.
    let long = params(BlockKind::Basic, [2, 2, 1, 1], 8, Stem::Imagenet, 3);
    let mut net = ResNet::build(&long, 32, 32, 10, &d).unwrap();
    let names = ResNet::torch_names(&long).unwrap();
    let e = kiln_core::import::load(&mut net, &fixture("resnet_basic.pth"), Some(&names), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no tensor layer2.1."), "{e}");
    // A new head: 5 classes instead of 10, with the classifier skipped, loads the rest.
    let mut net = ResNet::build(
        &params(BlockKind::Basic, [2, 1, 1, 1], 8, Stem::Imagenet, 3),
        32,
        32,
        5,
        &d,
    )
    .unwrap();
    let names = ResNet::torch_names(&params(
        BlockKind::Basic,
        [2, 1, 1, 1],
        8,
        Stem::Imagenet,
        3,
    ))
    .unwrap();
    let loaded = kiln_core::import::load(
        &mut net,
        &fixture("resnet_basic.pth"),
        Some(&names),
        &["fc".into()],
    )
    .unwrap();
    assert_eq!(loaded.skipped, 2);
    assert_eq!(loaded.applied, names.names.len() - 2);
}
