"""Development check of `kiln export --format onnx`: the ONNX checker accepts the graph, and
onnxruntime reproduces kiln's probabilities for the test images written beside it
(`<name>.sample.safetensors`) to 1e-4.

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
    (got,) = runtime.run(["probabilities"], {"pixels": sample["pixels"]})
    want = sample["probabilities"]
    worst = float(np.abs(got - want).max())
    opset = model.opset_import[0].version
    print(f"{path}: opset {opset}, {len(model.graph.node)} nodes; "
          f"max |onnxruntime − kiln| = {worst:.2e} over {want.shape[0]} images")
    if worst > 1e-4:
        sys.exit("mismatch")
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
