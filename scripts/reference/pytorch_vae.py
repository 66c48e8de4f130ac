#!/usr/bin/env python3
"""PyTorch's examples/vae (main.py), unchanged in what it computes, on Fashion-MNIST's IDX files.

The reference for kiln's `vae` config (docs/models/autoencoder.md): 784-400-(μ, log σ²) 20-400-784,
ReLU, sigmoid output; loss = BCE summed over pixels + KL, summed over the batch; Adam 1e-3,
batch 128, 10 epochs; test loss per image as the example prints it (one ε per test image).

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
    /tmp/torch/bin/python scripts/reference/pytorch_vae.py --seed 1 [--train-images 54000]

`--train-images 54000` trains on the first 90% of the training split, as kiln's default
(validation_split = 0.1) does; the default is all 60k, as the example does.
"""
import argparse
import resource
import gzip
import time

import numpy as np
import torch
from torch import nn, optim
from torch.nn import functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--train-images", type=int, default=60000)
ap.add_argument("--epochs", type=int, default=10)
ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
ap.add_argument("--bench", type=int, default=0, help="time this many training batches instead of training")
a = ap.parse_args()
torch.manual_seed(a.seed)


def images(name):
    """The IDX file `name` (`.gz`, or decompressed as in data/mnist)."""
    import os
    path = f"{a.data_dir}/{name}"
    with (gzip.open(path) if os.path.exists(path) else open(path[:-3], "rb")) as f:
        raw = f.read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784).astype(np.float32) / 255.0
    return torch.from_numpy(x)


train = images("train-images-idx3-ubyte.gz")[: a.train_images]
test = images("t10k-images-idx3-ubyte.gz")


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z):
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


model = VAE()
opt = optim.Adam(model.parameters(), lr=1e-3)
if a.bench:
    model.train()
    for i in range(a.bench + 2):
        if i == 2:
            t0 = time.perf_counter()
        x = train[i * 128:(i + 1) * 128]
        opt.zero_grad()
        recon, mu, logvar = model(x)
        loss_function(recon, x, mu, logvar).backward()
        opt.step()
    rate = a.bench * 128 / (time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128: "
          f"train {rate:.0f} images/s, epoch (est.) {60000 / rate:.1f} s (60000 images), "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    raise SystemExit
for epoch in range(1, a.epochs + 1):
    model.train()
    t0 = time.perf_counter()
    total = 0.0
    for idx in torch.randperm(len(train)).split(128):
        x = train[idx]
        opt.zero_grad()
        recon, mu, logvar = model(x)
        loss = loss_function(recon, x, mu, logvar)
        loss.backward()
        total += loss.item()
        opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    test_loss = 0.0
    with torch.no_grad():
        for x in test.split(128):
            recon, mu, logvar = model(x)
            test_loss += loss_function(recon, x, mu, logvar).item()
    print(
        f"epoch {epoch} train loss {total / len(train):.2f} test loss {test_loss / len(test):.2f}"
        f" train time {seconds:.2f} s ({len(train) / seconds:.0f} images/s)",
        flush=True,
    )
