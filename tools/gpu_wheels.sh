#!/usr/bin/env bash
# Fetch (on this machine) the wheels the lent GPU machine lacks, for its Python 3.12, into .whl/
# (ignored by git; the device run carries it: carry=[".whl"]). See /work/.library/device/README.md.
#   bash tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
# versions as in the project venv; their other needs (huggingface_hub, timm, regex, ...) are on the machine
PKGS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PKGS[@]}"
ls -l .whl
