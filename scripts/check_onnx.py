"""Development check of `kiln export --format onnx`: the ONNX checker accepts the graph, and
onnxruntime reproduces kiln's outputs for the sample inputs written beside it
(`<name>.sample.safetensors`: the graph's input and output by name — test images and
probabilities, codes and images, states and Q-values) to 1e-4.

    python3 -m venv target/torch && target/torch/bin/pip install onnx onnxruntime safetensors numpy
    kiln export runs/cnn-... --format onnx
    target/torch/bin/python scripts/check_onnx.py runs/cnn-.../model.onnx
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file


def main(path):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    sample = load_file(path[: -len(".onnx")] + ".sample.safetensors")
    runtime = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (x,), (y,) = model.graph.input, model.graph.output
    (got,) = runtime.run([y.name], {x.name: sample[x.name]})
    want = sample[y.name]
    worst = float(np.abs(got - want).max())
    opset = model.opset_import[0].version
    print(f"{path}: opset {opset}, {len(model.graph.node)} nodes; "
          f"{x.name} → {y.name}; max |onnxruntime − kiln| = {worst:.2e} over {want.shape[0]} inputs")
    if worst > 1e-4:
        sys.exit("mismatch")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
