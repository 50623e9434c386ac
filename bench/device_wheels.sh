#!/usr/bin/env bash
# Wheels for the GPU machine lent by the `device` tool (issue 9): it has torch, torchvision, pytest, hypothesis,
# scikit-learn, safetensors and matplotlib, but not fastai and its helpers, nor PyHessian, and it cannot reach a
# package registry. Run here, in the repository root; then name `.whl` in the run's `carry` and start its command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
# The list: the dependency closure of fastai, fastprogress and pyhessian in this project's .venv, minus what the device
# image holds (/work/.library/device/KINDS.md) and minus spacy (fastai.text only). ~3.3 MB, Python 3.12 wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
grep -qx '/.whl/' "$ex" 2>/dev/null || echo '/.whl/' >> "$ex"
mkdir -p .whl
for r in beartype==0.23.1 beautifulsoup4==4.15.0 fastai==2.8.12 fastcore==2.2.39 fastdownload==0.0.8 fastprogress==1.1.6 \
         fasttransform==0.0.5 httpcore2==2.16.2 httpx2==2.16.2 itsdangerous==2.2.0 oauthlib==4.0.1 plum-dispatch==2.9.0 \
         pyhessian==0.1 python-fasthtml==0.14.14 python-multipart==0.0.34 soupsieve==4.1.2 starlette==1.10.0 \
         truststore==0.10.5 tzdata==2026.6 uvicorn==0.54.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$r"
done
ls .whl
