#!/usr/bin/env python3
"""kiln's character models written in PyTorch: the references their speed is compared with
(`scripts/versus.sh`, docs/performance.md).

  --kind lstm         `char-rnn`: embedding 64 → LSTM 2×256 → linear to the vocabulary
  --kind gru          `char-gru`: embedding 64 → GRU 2×296 → linear
  --kind transformer  `char-transformer`: token + learned position embedding (d 128), 4 pre-norm
                      blocks x ← x + MHA(LN(x)) (4 heads, causal), x ← x + W₂·GELU(W₁·LN(x))
                      (MLP 512), final LN, linear to the vocabulary

Cross-entropy over every position of a window, Adam (lr 2e-3) with the gradient norm clipped
(5 for the recurrent nets, 1 for the Transformer); windows of T = 100 characters, batch 64
(Transformer: T = 128, batch 16), as the configs. The vocabulary is the distinct characters of
`--text`; the windows are drawn from it at random.

    python3 -m venv target/torch && target/torch/bin/pip install torch numpy
    target/torch/bin/python scripts/reference/pytorch_char.py --kind lstm --text FILE --bench 20

`--bench N` times N training steps after 2 warm-up steps and prints training characters per
second (batch × T × N / time), then samples 1000 characters one at a time (batch 1, the
recurrent state or — Transformer — the whole context re-read each step, as a plain PyTorch loop
does) and prints sampling characters per second, and the peak RSS.
"""
import argparse
import resource
import time

import torch
from torch import nn


class Recurrent(nn.Module):
    def __init__(self, V, cell, hidden, emb=64, layers=2):
        super().__init__()
        self.emb = nn.Embedding(V, emb)
        self.rnn = cell(emb, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, V)

    def forward(self, x, state=None):
        h, state = self.rnn(self.emb(x), state)
        return self.out(h), state


class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.att(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, V, T, d=128, heads=4, mlp=512, layers=4):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, V)

    def forward(self, x, state=None):
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), 1)
        h = self.emb(x) + self.pos(torch.arange(t))
        for b in self.blocks:
            h = b(h, mask)
        return self.out(self.ln(h)), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["lstm", "gru", "transformer"], required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--bench", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.manual_seed(a.seed)

    text = open(a.text, encoding="utf-8").read()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text[:200_000]], dtype=torch.long)
    V = len(vocab)
    T, B, clip = (128, 16, 1.0) if a.kind == "transformer" else (100, 64, 5.0)


    model = {
        "lstm": lambda: Recurrent(V, nn.LSTM, 256),
        "gru": lambda: Recurrent(V, nn.GRU, 296),
        "transformer": lambda: Transformer(V, T),
    }[a.kind]()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()


    def batch():
        starts = torch.randint(0, len(ids) - T - 1, (B,))
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        return x, y


    def step():
        x, y = batch()
        opt.zero_grad()
        logits, _ = model(x)
        loss = loss_fn(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


    model.train()
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(a.bench):
        step()
    train_rate = a.bench * B * T / (time.perf_counter() - t0)

    model.eval()
    n = 1000
    with torch.no_grad():
        x = torch.zeros((1, 1), dtype=torch.long)
        context, state = x, None
        t0 = time.perf_counter()
        for _ in range(n):
            if a.kind == "transformer":
                logits, _ = model(context[:, -T:])
            else:
                logits, state = model(x, state)
            p = torch.softmax(logits[0, -1], -1)
            x = torch.multinomial(p, 1).view(1, 1)
            context = torch.cat([context, x], 1)
        sample_rate = n / (time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.kind}, vocabulary {V}: "
          f"train {train_rate:.0f} characters/s, sampling {sample_rate:.0f} characters/s, "
          f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
