#!/usr/bin/env bash
# Fetch the CPU half of libtorch 2.9.0 (what burn 0.22's `tch` backend, through tch 0.22,
# is built against) from PyPI's torch wheel into target/libtorch/, for
# `just tch ...` (`cargo ... --features tch`).
#
# PyPI's Linux wheel is the CUDA build. Only its CPU libraries are kept: libtorch_cpu and
# libc10, plus the two small CUDA runtime libraries libtorch_cpu is linked against
# (libcudart, libcupti, from NVIDIA's PyPI packages; no GPU is used). libtorch.so, which
# would pull in the 1 GB libtorch_cuda and its cuDNN/cuBLAS dependencies, is replaced by an
# empty library of the same name. About 1 GB is downloaded; 0.5 GB stays on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/libtorch
lib="$dest/torch/lib"
if [ -f "$lib/libtorch_cpu.so" ] && [ -f "$dest/torch/version.py" ]; then
    echo "libtorch already in $dest"
    exit 0
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download --quiet --no-deps -d "$wheels" \
    torch==2.9.0 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-cupti-cu12==12.9.79
rm -rf "$dest" && mkdir -p "$dest"
python3 - "$wheels" "$dest" <<'PY'
import glob, os, shutil, sys, zipfile
wheels, dest = sys.argv[1], sys.argv[2]
lib = os.path.join(dest, "torch", "lib")
keep = ("libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libshm.so")
with zipfile.ZipFile(glob.glob(os.path.join(wheels, "torch-*.whl"))[0]) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("torch/include/") or name == "torch/version.py" or (
            name.startswith("torch/lib/") and base in keep
        ):
            z.extract(name, dest)
for pattern, so in (("nvidia_cuda_runtime*", "libcudart.so.12"), ("nvidia_cuda_cupti*", "libcupti.so.12")):
    with zipfile.ZipFile(glob.glob(os.path.join(wheels, pattern + ".whl"))[0]) as z:
        member = next(n for n in z.namelist() if n.endswith("/" + so))
        with z.open(member) as src, open(os.path.join(lib, so), "wb") as out:
            shutil.copyfileobj(src, out)
PY
# An empty libtorch.so: tch links `-ltorch`, whose only job in the CUDA build is to load libtorch_cuda.
echo 'void kiln_libtorch_stub(void) {}' > "$wheels/stub.c"
cc -shared -fPIC -o "$lib/libtorch.so" "$wheels/stub.c"
echo "libtorch (CPU) in $dest: $(du -sh "$dest" | cut -f1)"
