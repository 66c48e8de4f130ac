#!/usr/bin/env python3
"""kiln's default `cnn` network written in PyTorch, on Fashion-MNIST's IDX files: the reference
its speed and accuracy are compared with (docs/performance.md, docs/models/cnn.md).

conv 32 3×3 (same) → BN → ReLU → pool → conv 64 3×3 (same) → BN → ReLU → pool → dropout 0.25
→ dense 128 (ReLU) → dropout 0.3 → dense 10; cross-entropy, Adam 1e-3, the learning rate
times 0.9 each epoch, batch 128, pixels standardised with the training images' mean and
deviation; the last 10% of the training split validates, the test set is evaluated at the end.

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
    /tmp/torch/bin/python scripts/reference/pytorch_cnn.py --bench 50     # as `kiln bench cnn`
    /tmp/torch/bin/python scripts/reference/pytorch_cnn.py --epochs 15    # as `kiln train cnn`

`--bench N` times N training steps (forward, backward, Adam) after 2 warm-up steps, then
inference over the same images, and prints images per second and the epoch they imply.
"""
import argparse
import resource
import gzip
import time

import numpy as np
import torch
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--epochs", type=int, default=15)
ap.add_argument("--bench", type=int, default=0, help="time this many training batches instead of training")
ap.add_argument("--batch-size", type=int, default=128)
ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
a = ap.parse_args()
torch.manual_seed(a.seed)


def idx(name, offset):
    """The IDX file `name` (`.gz`, or decompressed as in data/mnist)."""
    import os
    path = f"{a.data_dir}/{name}"
    with (gzip.open(path) if os.path.exists(path) else open(path[:-3], "rb")) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def images(name):
    return torch.from_numpy(idx(name, 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)


def labels(name):
    return torch.from_numpy(idx(name, 8).astype(np.int64))


x_all, y_all = images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz")
x_test, y_test = images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz")
n_train = len(x_all) - len(x_all) // 10
x_train, y_train = x_all[:n_train], y_all[:n_train]
x_val, y_val = x_all[n_train:], y_all[n_train:]
mean, std = x_train.mean(), x_train.std()
x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.3),
    nn.Linear(128, 10),
)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
loss_fn = nn.CrossEntropyLoss()


def step(x, y):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def accuracy(x, y):
    model.eval()
    with torch.no_grad():
        right = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500)))
    return right / len(y)


if a.bench:
    b = a.batch_size
    model.train()
    for i in range(2):
        step(x_train[i * b:(i + 1) * b], y_train[i * b:(i + 1) * b])
    t0 = time.perf_counter()
    for i in range(a.bench):
        step(x_train[i * b:(i + 1) * b], y_train[i * b:(i + 1) * b])
    train_rate = a.bench * b / (time.perf_counter() - t0)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(a.bench):
            model(x_train[i * b:(i + 1) * b])
    infer_rate = a.bench * b / (time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}: "
          f"train {train_rate:.0f} images/s, inference {infer_rate:.0f} images/s, "
          f"epoch (est.) {60000 / train_rate:.1f} s (60000 images), "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
else:
    for epoch in range(1, a.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n_train)
        total = 0.0
        for ids in perm.split(a.batch_size):
            total += step(x_train[ids], y_train[ids]) * len(ids)
        seconds = time.perf_counter() - t0
        decay.step()
        print(f"epoch {epoch} train loss {total / n_train:.4f} val accuracy {accuracy(x_val, y_val):.4f}"
              f" train time {seconds:.1f} s", flush=True)
    print(f"test accuracy {accuracy(x_test, y_test):.4f}")
