#!/usr/bin/env bash
# The transfer-learning experiment of docs/models/resnet.md: a ResNet trained on Fashion-MNIST
# (`kiln train resnet`), fine-tuned on 100 and 1,000 labelled MNIST images — every layer, or a
# new head on the frozen backbone — against the same network from scratch on the same images.
# Test accuracy on all 10,000 MNIST test images.
#
#   scripts/transfer.sh runs/resnet-…  [OUT]      (MNIST in data/mnist or downloadable)
set -euo pipefail
pre=${1:?usage: scripts/transfer.sh PRETRAINED_RUN [OUT]}
out=${2:-runs/transfer}
kiln=${KILN:-target/release/kiln}
"$kiln" export "$pre" >/dev/null
weights="$pre/model.safetensors"
mkdir -p "$out"
printf '| labelled MNIST images | from scratch | fine-tuned, every layer | new head, frozen backbone |\n|---|---|---|---|\n'
for n in 100 1000; do
    epochs=$(( n == 100 ? 30 : 20 ))
    common=(--set dataset=mnist --set "params.train_limit=$n" --set train.batch_size=32
            --set "train.epochs=$epochs" --set 'params.augment={}')  # digits are not mirrored
    tuned=(--set "params.pretrained=\"$weights\"" --set 'params.head={ classes = 10 }')
    "$kiln" train resnet "${common[@]}" --out "$out/scratch-$n" >/dev/null 2>&1
    "$kiln" train resnet "${common[@]}" "${tuned[@]}" --out "$out/tuned-$n" >/dev/null 2>&1
    "$kiln" train resnet "${common[@]}" "${tuned[@]}" --set 'params.freeze="backbone"' \
        --out "$out/frozen-$n" >/dev/null 2>&1
    acc() { python3 -c "import json,sys; print(f\"{100*json.load(open(sys.argv[1]))['test']['accuracy']:.2f}%\")" "$1/summary.json"; }
    printf '| %s | %s | %s | %s |\n' "$n" "$(acc "$out/scratch-$n")" "$(acc "$out/tuned-$n")" "$(acc "$out/frozen-$n")"
done
