# kiln — train the classic deep-learning models on Burn.  `just` lists the recipes.

# List the recipes.
default:
    @just --list

# Train a model by config name, e.g. `just train cnn` or `just train linear --set train.epochs=50`.
train model *ARGS:
    cargo run --release -p kiln-runner -- train {{model}} {{ARGS}}

# Train on a GPU backend: `just train-on wgpu cnn`, `just train-on cuda cnn` (builds kiln with it).
train-on backend model *ARGS:
    cargo run --release -p kiln-runner --features {{backend}} -- train {{model}} --backend {{backend}} {{ARGS}}

# Any kiln command, release build: `just kiln list`, `just kiln predict runs/... --input 5,3`.
kiln *ARGS:
    cargo run --release -p kiln-runner -- {{ARGS}}

# It runs inside a checkout (any directory of it), where configs/ and data/ are.
# Put `kiln` on the PATH (~/.cargo/bin/kiln): `just install`, `just install wgpu`, `just install cuda`.
install *BACKEND:
    cargo install --locked --path crates/runner {{ if BACKEND == "" { "" } else { "--features " + BACKEND } }}

# The tests need no data packages and no network: they use data/ and data they write
# themselves. cargo-nextest, where installed, runs the test binaries side by side (doc tests,
# which it does not run, follow); without it `cargo test` runs them one after another. Either
# way a failure does not stop the binaries after it. `--all-targets` builds what the tests
# build, so Burn compiles once. `just test wgpu` needs a Vulkan device (a GPU, or Mesa's
# lavapipe: `apt install mesa-vulkan-drivers`).
# Build, then run every unit and end-to-end test (CPU backends; `just test wgpu`: wgpu too).
test *EXTRA:
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{EXTRA}}" in
        "") features=() ;;
        wgpu) features=(--features "{{gpu_features}}") ;;
        *) echo "usage: just test [wgpu]" >&2; exit 2 ;;
    esac
    command -v cc >/dev/null || { echo "kiln's build needs a C compiler: apt install gcc (or build-essential)" >&2; exit 1; }
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
    cargo build --workspace --all-targets "${features[@]}"
    # The SLURM sweep test is ignored unless a cluster answers (`just slurm start`).
    slurm=()
    if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|alloc'; then slurm=(--run-ignored all); fi
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace "${features[@]}" --no-fail-fast ${slurm[@]+"${slurm[@]}"}
        cargo test --doc --workspace "${features[@]}"
    else
        include=()
        [ ${#slurm[@]} -gt 0 ] && include=(-- --include-ignored)
        cargo test --workspace "${features[@]}" --no-fail-fast ${include[@]+"${include[@]}"}
    fi

# Formatting and clippy, warnings are errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Clippy on the wgpu build: the wgpu-only tests and code paths too (what CI lints).
lint-wgpu:
    cargo clippy --workspace --all-targets --features {{gpu_features}} -- -D warnings

# DOCS_RS=1 tells CubeCL's LLVM bundler (a CUDA build dependency) not to download LLVM,
# which a check does not need and an offline machine cannot fetch.
# Clippy with both GPU backends (wgpu, cuda) compiled in: type-checks cuda without a GPU.
check-gpu:
    DOCS_RS=1 cargo clippy --workspace --all-targets --features {{gpu_features}},kiln-runner/cuda -- -D warnings

gpu_features := "kiln-runner/wgpu,kiln-tests/wgpu"

# `just bench`, `just bench mlp`, `just bench cnn --backend flex --batches 100`.
# Train/inference images/s, epoch time, peak memory per CPU backend, on Fashion-MNIST (release).
bench model="cnn" *ARGS:
    cargo run --release -p kiln-runner -- bench {{model}} --set dataset=fashion-mnist {{ARGS}}

# torch from PyPI into target/torch; char-rnn, char-gru, char-transformer, cnn or vae.
# kiln beside PyTorch on this machine, alternating 3 times: `just versus char-rnn`.
versus config rounds="3":
    bash scripts/versus.sh {{config}} {{rounds}}

# LibTorch 2.9's CPU libraries (from PyPI's torch wheel) into target/libtorch, for `just tch`.
setup-tch:
    bash scripts/setup-libtorch.sh

# Any kiln command on a build with the LibTorch CPU backend: `just tch bench cnn --backend tch`.
tch *ARGS: setup-tch
    LIBTORCH="$PWD/target/libtorch/torch" LD_LIBRARY_PATH="$PWD/target/libtorch/torch/lib" \
        cargo run --release -p kiln-runner --features tch -- {{ARGS}}

# `just sweep logistic --grid train.learning_rate=0.01,0.1 --seeds 3` (see docs/sweeps.md).
sweep *ARGS:
    cargo run --release -p kiln-runner -- sweep {{ARGS}}

# A one-node SLURM cluster on this machine (Debian, root) for `kiln sweep --slurm` and its test.
slurm action="start":
    bash scripts/slurm-local.sh {{action}}

# API docs of kiln's crates (target/doc), warnings are errors.
doc:
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Clippy-driver as the rustc of kiln's own crates gives the lints of `cargo clippy -D warnings`
# without a second check build of every dependency.
# What CI runs (.ci/run): formatting, then `just test wgpu` linted by clippy as it compiles.
ci:
    cargo fmt --all --check
    RUSTC_WORKSPACE_WRAPPER=clippy-driver CLIPPY_ARGS="-Dwarnings__CLIPPY_HACKERY__" just test wgpu
