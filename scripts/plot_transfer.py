"""The transfer-learning curve of docs/models/resnet.md: validation accuracy per epoch of the
runs scripts/transfer.sh leaves in OUT (from scratch, fine-tuned, frozen backbone), for N labels.

    target/torch/bin/python scripts/plot_transfer.py runs/transfer 1000 docs/img/resnet-transfer.png
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def column(path, name):
    with open(path) as f:
        return [float(r[name]) for r in csv.DictReader(f)]


def main(out_dir, n, png):
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for run, label in [
        ("scratch", "from scratch"),
        ("tuned", "fine-tuned from Fashion-MNIST, every layer"),
        ("frozen", "new head on the frozen Fashion-MNIST backbone"),
    ]:
        acc = column(f"{out_dir}/{run}-{n}/metrics.csv", "val_accuracy")
        ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], marker=".", label=label)
    ax.set_title(f"ResNet on {n} labelled MNIST images")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


if __name__ == "__main__":
    main(*sys.argv[1:4])
