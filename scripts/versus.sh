#!/usr/bin/env bash
# kiln beside PyTorch on this machine: `kiln bench <config>` and the config's PyTorch twin
# (scripts/reference/), alternating ROUNDS times (default 3) in one run, then both training
# rates and their ratio, kiln / PyTorch, and the machine's CPU model and SIMD width.
#
#   scripts/versus.sh char-rnn | char-gru | char-transformer | cnn | vae | gan  [ROUNDS]
#   (just versus <config>)
#
# torch and numpy come from PyPI into target/torch (a development tool, not a test
# dependency). The character models read TEXT (default: the repository's Markdown, about the
# fortunes' vocabulary size); cnn, vae and gan read MNIST from data/mnist (`just train cnn`
# downloads it) or DATA_DIR. Rates drift from hour to hour: compare ratios from one run.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: scripts/versus.sh char-rnn|char-gru|char-transformer|cnn|vae|gan [ROUNDS]}
rounds=${2:-3}
kiln=target/release/kiln
cargo build --release -q -p kiln-runner
venv=target/torch
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch numpy
fi
py="$venv/bin/python"
threads=$(nproc)
export OMP_NUM_THREADS=$threads

data_dir=${DATA_DIR:-data/mnist}
text=${TEXT:-target/versus-text.txt}
if [ -z "${TEXT:-}" ]; then
    cat README.md CHANGELOG.md docs/*.md docs/models/*.md data/README.md > "$text"
fi

case "$config" in
    char-rnn) kind=lstm ;;
    char-gru) kind=gru ;;
    char-transformer) kind=transformer ;;
    cnn | vae | gan) kind=$config ;;
    *) echo "versus: no PyTorch twin for $config (char-rnn, char-gru, char-transformer, cnn, vae, gan)" >&2; exit 2 ;;
esac

kiln_bench() {
    case "$kind" in
        lstm | gru | transformer)
            "$kiln" bench "$config" --backend flex --batches 20 --set "params.data.text=\"$PWD/$text\"" --set 'params.data.exclude=[]' ;;
        cnn) "$kiln" bench cnn --backend flex --batches 50 --set dataset=mnist --set "data_dir=\"$PWD/$data_dir\"" ;;
        vae) "$kiln" bench vae --backend flex --batches 200 --set dataset=mnist --set "data_dir=\"$PWD/$data_dir\"" ;;
        gan) "$kiln" bench gan --backend flex --batches 40 --set dataset=mnist --set "data_dir=\"$PWD/$data_dir\"" ;;
    esac
}
torch_bench() {
    case "$kind" in
        lstm | gru | transformer) "$py" scripts/reference/pytorch_char.py --kind "$kind" --text "$text" --bench 20 ;;
        cnn) "$py" scripts/reference/pytorch_cnn.py --bench 50 --data-dir "$data_dir" ;;
        vae) "$py" scripts/reference/pytorch_vae.py --bench 200 --data-dir "$data_dir" ;;
        gan) "$py" scripts/reference/pytorch_dcgan.py --bench 40 --data-dir "$data_dir" ;;
    esac
}

# The training rate: kiln's table row (third column), PyTorch's "train N <unit>/s".
kiln_rate() { awk -F'|' '/^\| flex/ { gsub(/ /, "", $4); print $4 }'; }
torch_rate() { sed -n 's/.*train \([0-9]*\) .*/\1/p'; }

cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
simd=AVX2
grep -q avx512f /proc/cpuinfo && simd=AVX-512
grep -q avx2 /proc/cpuinfo || simd="no AVX2"
echo "$config on $cpu ($simd, $threads threads), $rounds rounds, kiln first in each"
ratios=()
for r in $(seq "$rounds"); do
    k_out=$(kiln_bench 2>&1)
    k=$(echo "$k_out" | kiln_rate)
    t_out=$(torch_bench 2>&1)
    t=$(echo "$t_out" | torch_rate)
    if [ -z "$k" ] || [ -z "$t" ]; then
        echo "round $r: could not read a rate"; echo "$k_out"; echo "$t_out"; exit 1
    fi
    ratio=$(python3 -c "print(f'{$k / $t:.2f}')")
    ratios+=("$ratio")
    echo "round $r: kiln $k/s, PyTorch $t/s, kiln / PyTorch $ratio"
    echo "$k_out" | awk -F'|' '/^\| flex/ { print "  kiln: peak RSS" $7 }'
    echo "$k_out" | sed -n 's/^flex: \(sampling [0-9]* characters\/s\).*/  kiln: \1/p'
    echo "$t_out" | sed -n 's/.*\(sampling [0-9]* characters\/s\).*\(peak RSS.*\)/  PyTorch: \1, \2/p'
    echo "$t_out" | grep -v sampling | sed -n 's/.*\(peak RSS [0-9]* MiB\).*/  PyTorch: \1/p' || true
done
echo "kiln / PyTorch, training: ${ratios[*]}"
