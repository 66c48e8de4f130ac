# kiln — train the classic deep-learning models on Burn.  `just` lists the recipes.

# List the recipes.
default:
    @just --list

# Train a model by config name, e.g. `just train cnn` or `just train linear --set train.epochs=50`.
train model *ARGS:
    cargo run --release -p kiln-runner -- train {{model}} {{ARGS}}

# Any kiln command, release build: `just kiln list`, `just kiln predict runs/... --input 5,3`.
kiln *ARGS:
    cargo run --release -p kiln-runner -- {{ARGS}}

# `--workspace --all-targets` resolves the same dependency features as `cargo test
# --workspace`, so the tests reuse this build instead of compiling Burn a second time.
# Build the CLI, then run every unit and end-to-end test on the CPU backends.
test:
    cargo build --workspace --all-targets
    cargo test --workspace

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

# Without a GPU, Mesa's lavapipe (`apt install mesa-vulkan-drivers`) is the Vulkan device.
# Build with wgpu and run the tests that need it: parity with flex, every family's smoke run.
test-wgpu:
    cargo build --workspace --all-targets --features {{gpu_features}}
    XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}" cargo test --workspace --features {{gpu_features}} -- wgpu

# `just bench`, `just bench mlp`, `just bench cnn --backend flex --batches 100`.
# Train/inference images/s, epoch time, peak memory per CPU backend, on Fashion-MNIST (release).
bench model="cnn" *ARGS:
    cargo run --release -p kiln-runner -- bench {{model}} --set dataset=fashion-mnist {{ARGS}}

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

# (The CPU-only build of `just test` would compile Burn a second time for the same tests.)
# cargo-nextest, where installed, runs every test in its own process and keeps both cores busy
# across test binaries (`cargo test` runs the binaries one after another); it does not run
# doc tests, hence the last line. Without nextest, `cargo test` runs everything.
# Every test, on the CPU backends and on wgpu, from one build with wgpu compiled in.
test-all:
    cargo build --workspace --all-targets --features {{gpu_features}}
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"; if cargo nextest --version >/dev/null 2>&1; then cargo nextest run --workspace --features {{gpu_features}} --no-fail-fast && cargo test --doc --workspace --features {{gpu_features}}; else cargo test --workspace --features {{gpu_features}}; fi

# Clippy-driver is the rustc of kiln's own crates: the lints `cargo clippy` gives (warnings
# are errors), but during the real build instead of a separate check build of every
# dependency (9 minutes here). `CLIPPY_ARGS` is how cargo-clippy hands its `-- -D warnings`
# to the driver. CI thus lints the wgpu build; `just lint` (the CPU-only build) and `just doc`
# (one more check build, for rustdoc) are for before a commit.
# What CI runs: formatting, then test-all with clippy linting kiln's crates as they compile.
ci:
    cargo fmt --all --check
    RUSTC_WORKSPACE_WRAPPER=clippy-driver CLIPPY_ARGS="-Dwarnings__CLIPPY_HACKERY__" just test-all
