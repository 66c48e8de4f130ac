"""Load `kiln export`'s safetensors into the PyTorch twin and compare predictions with kiln's
(a development check; torch and safetensors from PyPI in a local virtual environment).

A `vae` run (dense, one hidden layer: the shape of PyTorch's examples/vae,
`scripts/reference/pytorch_vae.py`) loads into that `VAE`; its codes μ for five random
pictures must match `kiln predict --image`'s to the four decimals printed, and its decoder's
images for the codes of `kiln export --format onnx`'s sample file must match kiln's to 1e-5.

A `char-rnn` or `char-gru` run loads into `scripts/reference/pytorch_char.py`'s
`Recurrent(nn.LSTM | nn.GRU)` (embedding, stacked LSTM or GRU, output layer, sized by the file),
a `char-transformer` run into its `Transformer` (nn.MultiheadAttention, pre-norm blocks); the
greedy continuation of three prompts must be `kiln sample --top-k 1`'s, character for
character.

    scripts/versus.sh creates target/torch; then: target/torch/bin/pip install safetensors
    kiln export runs/<cnn-run>
    target/torch/bin/python scripts/check_export.py runs/<cnn-run> [path/to/kiln]

The twin is `scripts/reference/pytorch_cnn.py`'s network, built from the run's
`params.net` by the same rule; `load_state_dict(strict=True)` must take the file as it is.
Then five seeded random images go through both and the top-3 class probabilities must agree
to the three decimals `kiln predict` prints.
"""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from pytorch_char import Recurrent, Transformer  # noqa: E402  (the twins of the char models)


def twin(net: dict, height: int, width: int, classes: int) -> nn.Sequential:
    k = net.get("kernel", 3)
    pad = k // 2 if net.get("padding", "valid") == "same" else 0
    layers, ch, h, w = [], 1, height, width
    per_block = net.get("per_block", 1)
    for filters in net["conv"]:
        for _ in range(per_block):
            layers.append(nn.Conv2d(ch, filters, k, padding=pad))
            if net.get("batch_norm", False):
                layers.append(nn.BatchNorm2d(filters))
            layers.append(nn.ReLU())
            ch, h, w = filters, h + 2 * pad - k + 1, w + 2 * pad - k + 1
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    if net.get("dropout", 0.0) > 0:
        layers.append(nn.Dropout(net["dropout"]))
    layers.append(nn.Flatten())
    width_in = ch * h * w
    for d in net.get("dense", []):
        layers += [nn.Linear(width_in, d), nn.ReLU()]
        if net.get("dense_dropout", 0.0) > 0:
            layers.append(nn.Dropout(net["dense_dropout"]))
        width_in = d
    layers.append(nn.Linear(width_in, classes))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """scripts/reference/pytorch_vae.py's network, sized by the file."""

    def __init__(self, d, hidden, latent):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, d)

    def encode(self, x):
        h1 = torch.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z):
        return torch.sigmoid(self.fc4(torch.relu(self.fc3(z))))


def check_vae(run: Path, kiln: str) -> int:
    from PIL import Image

    state = load_file(run / "model.safetensors")
    hidden, d = state["fc1.weight"].shape
    model = VAE(d, hidden, state["fc21.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    info = json.loads((run / "generative.json").read_text())
    h, w = info["height"], info["width"]
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for i in range(5):
        # Dark pictures: kiln's predict inverts light-bordered photos of dark-ground sets.
        pixels = (torch.rand(h, w, generator=gen) * 100).to(torch.uint8)
        png = run / f"check-{i}.png"
        Image.fromarray(pixels.numpy(), mode="L").save(png)
        with torch.no_grad():
            mu, _ = model.encode(pixels.reshape(1, -1).float() / 255)
        ours = "code: [" + ", ".join(f"{v:.4f}" for v in mu[0].tolist()) + "]"
        theirs = subprocess.run([kiln, "predict", str(run), "--image", str(png)],
                                capture_output=True, text=True, check=True).stdout.strip()
        png.unlink()
        same = ours == theirs
        bad += not same
        print(f"picture {i}: PyTorch {ours} | kiln {theirs} {'ok' if same else 'DIFFERENT'}")
    subprocess.run([kiln, "export", str(run), "--format", "onnx"], capture_output=True, check=True)
    sample = load_file(run / "model.sample.safetensors")
    with torch.no_grad():
        images = model.decode(sample["z"]).reshape(sample["images"].shape)
    worst = float((images - sample["images"]).abs().max())
    print(f"decoder: max |PyTorch − kiln| = {worst:.1e} over {len(images)} codes")
    bad += worst > 1e-5
    print("ok: strict load, same codes and images" if bad == 0 else "DIFFERENT")
    return 1 if bad else 0


def check_char(run: Path, kiln: str, net: dict) -> int:
    state = load_file(run / "model.safetensors")
    vocab = json.loads((run / "vocab.json").read_text())["chars"]
    V, emb = state["emb.weight"].shape
    if net.get("kind") == "transformer":
        layers = sum(1 for k in state if k.endswith(".att.in_proj_weight"))
        T = state["pos.weight"].shape[0]
        mlp = state["blocks.0.mlp.0.weight"].shape[0]
        model = Transformer(V, T, emb, net.get("heads", 4), mlp, layers)
    else:
        layers = sum(1 for k in state if k.startswith("rnn.weight_ih_l"))
        hidden = state["rnn.weight_hh_l0"].shape[1]
        cell = nn.GRU if net.get("cell") == "gru" else nn.LSTM
        model = Recurrent(V, cell, hidden, emb, layers)
    model.load_state_dict(state, strict=True)
    model.eval()
    bad = 0
    for prompt in ["The ", "A man ", "Q: "]:
        ids = torch.tensor([[vocab.index(c) for c in prompt]])
        text, state_ = prompt, None
        n = 80 if net.get("kind") != "transformer" else min(80, T - len(prompt))
        with torch.no_grad():
            for _ in range(n):
                if net.get("kind") == "transformer":
                    logits = model(ids)[0][0, -1]
                else:
                    logits, state_ = model(ids[:, -1:] if state_ is not None else ids, state_)
                    logits = logits[0, -1]
                nxt = int(logits.argmax())
                text += vocab[nxt]
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        theirs = subprocess.run([kiln, "sample", str(run), "--prompt", prompt, "--len", str(n),
                                 "--top-k", "1"], capture_output=True, text=True, check=True).stdout
        same = theirs.rstrip("\n") == text
        bad += not same
        print(f"{prompt!r}: {'same' if same else 'DIFFERENT'}: {text!r}")
        if not same:
            print(f"  kiln: {theirs!r}")
    print("ok: strict load, same greedy text" if bad == 0 else f"{bad} of 3 differ")
    return 1 if bad else 0


def main(run: Path, kiln: str) -> int:
    cfg = tomllib.loads((run / "config.toml").read_text())
    if cfg["model"] == "vae":
        return check_vae(run, kiln)
    if cfg["model"] in ("char-rnn", "char-gru", "char-transformer"):
        return check_char(run, kiln, cfg["params"]["net"])
    pre = json.loads((run / "preprocessing.json").read_text())
    h, w, classes = pre["height"], pre["width"], pre["classes"]
    model = twin(cfg["params"]["net"], h, w, len(classes))
    model.load_state_dict(load_file(run / "model.safetensors"), strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for i in range(5):
        x = torch.rand(h * w, generator=gen)
        with torch.no_grad():
            p = torch.softmax(model(((x - pre["mean"]) / pre["std"]).reshape(1, 1, h, w)), 1)[0]
        top = p.argsort(descending=True)[:3]
        ours = ", ".join(f"{classes[c]} {p[c]:.3f}" for c in top)
        values = ",".join(f"{v:.9g}" for v in x.tolist())
        theirs = subprocess.run([kiln, "predict", str(run), "--input", values],
                                capture_output=True, text=True, check=True).stdout.strip()
        same = ours == theirs
        bad += not same
        print(f"image {i}: PyTorch {ours} | kiln {theirs} {'ok' if same else 'DIFFERENT'}")
    print("ok: strict load, same predictions" if bad == 0 else f"{bad} of 5 differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "target/release/kiln"))
