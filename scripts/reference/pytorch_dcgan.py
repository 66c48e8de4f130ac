#!/usr/bin/env python3
"""The PyTorch twin of kiln's `gan` config (docs/models/gan.md): the same DCGAN, loss and
optimiser, so that kiln's judge can score PyTorch's generator beside kiln's.

G: z ∈ ℝ¹⁰⁰ → Linear → 64×7×7 → BN → ReLU → ConvTranspose 4×4/2 (32) → BN → ReLU →
ConvTranspose 4×4/2 (1) → tanh. D: Conv 4×4/2 (32) → LeakyReLU 0.2 → Conv 4×4/2 (64) → BN →
LeakyReLU 0.2 → Linear → logit. PyTorch's default initialisation (kiln's `init = "default"`).
Per batch of 64 real images (scaled to [−1, 1]): a D step on BCE(D(x), 0.9) + BCE(D(G(z)), 0)
(one-sided label smoothing 0.1, real and fake batches through D separately), then a G step on
BCE(D(G(z')), 1) with fresh noise. Adam 2e-4, β = (0.5, 0.999) for both; 10 epochs over all
60k training images, shuffled each epoch.

    python3 -m venv target/torch && target/torch/bin/pip install torch numpy safetensors
    target/torch/bin/python scripts/reference/pytorch_dcgan.py --data-dir data/fashion-mnist \\
        --like runs/gan-… --out target/pytorch-gan.safetensors
    kiln sample target/pytorch-gan.safetensors --n 1000 --judge runs/cnn-…   # kiln's judge

`--like RUN` (a finished kiln `gan` run of the same network) lends the file the metadata
`kiln export` writes (the run's config and JSON files) and the map from these names to
kiln's, so `kiln sample` takes PyTorch's generator as it takes an exported kiln one.
`--bench N` times N training batches instead (scripts/versus.sh gan).
"""
import argparse
import gzip
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--epochs", type=int, default=10)
ap.add_argument("--data-dir", default="data/fashion-mnist")
ap.add_argument("--bench", type=int, default=0, help="time this many training batches instead of training")
ap.add_argument("--like", help="a kiln gan run whose config and JSON files the output carries")
ap.add_argument("--out", default="target/pytorch-gan.safetensors")
a = ap.parse_args()
torch.manual_seed(a.seed)
LATENT, BATCH = 100, 64


def images(name):
    """The IDX file `name` (`.gz`, or decompressed as in data/mnist), scaled to [−1, 1]."""
    path = f"{a.data_dir}/{name}"
    with (gzip.open(path) if os.path.exists(path) else open(path[:-3], "rb")) as f:
        raw = f.read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32)
    return torch.from_numpy(x / 255.0 * 2.0 - 1.0)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(LATENT, 64 * 7 * 7)
        self.bn0, self.bn1 = nn.BatchNorm2d(64), nn.BatchNorm2d(32)
        self.deconv0 = nn.ConvTranspose2d(64, 32, 4, 2, 1)
        self.deconv1 = nn.ConvTranspose2d(32, 1, 4, 2, 1)

    def forward(self, z):
        x = F.relu(self.bn0(self.out(z).view(-1, 64, 7, 7)))
        x = F.relu(self.bn1(self.deconv0(x)))
        return torch.tanh(self.deconv1(x))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 4, 2, 1)
        self.conv1 = nn.Conv2d(32, 64, 4, 2, 1)
        self.bn = nn.BatchNorm2d(64)
        self.out = nn.Linear(64 * 7 * 7, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv0(x), 0.2)
        x = F.leaky_relu(self.bn(self.conv1(x)), 0.2)
        return self.out(x.flatten(1))


g, d = Generator(), Discriminator()
g_opt = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
d_opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def train_batch(x):
    m = len(x)
    fake = g(torch.randn(m, LATENT)).detach()
    d_opt.zero_grad()
    d_loss = bce(d(x), 0.9) + bce(d(fake), 0.0)
    d_loss.backward()
    d_opt.step()
    g_opt.zero_grad()
    g_loss = bce(d(g(torch.randn(m, LATENT))), 1.0)
    g_loss.backward()
    g_opt.step()
    return d_loss.item(), g_loss.item()


train = images("train-images-idx3-ubyte.gz")
if a.bench:
    for i in range(a.bench + 2):
        if i == 2:
            t0 = time.perf_counter()
        train_batch(train[i * BATCH:(i + 1) * BATCH])
    rate = a.bench * BATCH / (time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}: "
          f"train {rate:.0f} images/s, epoch (est.) {len(train) / rate:.1f} s ({len(train)} images), "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    raise SystemExit

for epoch in range(1, a.epochs + 1):
    t0 = time.perf_counter()
    losses = [train_batch(train[idx]) for idx in torch.randperm(len(train)).split(BATCH)]
    seconds = time.perf_counter() - t0
    dl, gl = np.mean(losses, axis=0)
    print(f"epoch {epoch} d_loss {dl:.4f} g_loss {gl:.4f} train time {seconds:.1f} s "
          f"({len(train) / seconds:.0f} images/s)", flush=True)

# Kiln's names for G's tensors: [kiln name, transpose] (a Linear weight is [in, out] in Burn).
names = {"out.weight": ["out.weight", True], "out.bias": ["out.bias", False]}
for i in range(2):
    for torch_part, burn_part in [("weight", "gamma"), ("bias", "beta"),
                                  ("running_mean", "running_mean"), ("running_var", "running_var")]:
        names[f"bn{i}.{torch_part}"] = [f"bn.{i}.{burn_part}", False]
    for part in ["weight", "bias"]:
        names[f"deconv{i}.{part}"] = [f"deconv.{i}.{part}", False]
state = {k: v.contiguous() for k, v in g.state_dict().items() if k in names}
metadata = {"producer": "scripts/reference/pytorch_dcgan.py", "format": "pt"}
if a.like:
    run = Path(a.like)
    metadata["kiln.config"] = (run / "config.toml").read_text()
    metadata["kiln.files"] = json.dumps({p.name: p.read_text() for p in sorted(run.glob("*.json"))
                                         if p.name != "summary.json"})
    metadata["kiln.names"] = json.dumps(names)
from safetensors.torch import save_file  # noqa: E402

save_file(state, a.out, metadata=metadata)
print(a.out)
