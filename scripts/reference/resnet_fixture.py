"""Writes the ResNet fixtures of kiln's parity test (tests/fixtures/resnet_*):
torchvision's ResNet layout (torchvision.models.resnet's BasicBlock and Bottleneck, its
_make_layer, the ImageNet stem) at a small width, with random weights and random batch-norm
running averages, its input and its output in evaluation mode.

    python3 -m venv target/torch && target/torch/bin/pip install torch torchvision safetensors
    target/torch/bin/python scripts/reference/resnet_fixture.py tests/fixtures

kiln's `crates/models/resnet` test loads the weights (`.pth` and `.safetensors`) and must
reproduce the outputs to 1e-5.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class SmallResNet(ResNet):
    """torchvision's ResNet with `width` planes in the first stage instead of 64 (every
    module and name as torchvision builds them)."""

    def __init__(self, block, layers, width, num_classes, in_channels=3):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)


def randomise(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.running_mean.uniform_(-0.3, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(7)


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(2015)
    torch.manual_seed(2015)
    io = {}
    for name, block, layers, width in [
        ("basic", BasicBlock, [2, 1, 1, 1], 8),
        ("bottleneck", Bottleneck, [1, 2, 1, 1], 4),
    ]:
        model = SmallResNet(block, layers, width, num_classes=10)
        randomise(model, gen)
        model.eval()
        x = torch.randn(2, 3, 32, 32, generator=gen)
        with torch.no_grad():
            y = model(x)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if name == "basic":
            torch.save(state, out / f"resnet_{name}.pth")
        else:
            save_file(state, str(out / f"resnet_{name}.safetensors"))
        io[f"{name}.input"] = x.contiguous()
        io[f"{name}.output"] = y.contiguous()
        print(name, sum(p.numel() for p in model.parameters()), "parameters")
    save_file(io, str(out / "resnet_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
