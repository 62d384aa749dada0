#!/bin/sh
# Installs kubearq from its built wheel into a fresh virtual environment: the one install step of the image
# (Dockerfile), kept here so that it can be tested where no container engine runs (tests/test_image.py).
#
#   docker/install.sh WHEEL VENV
#
# Dependencies come from pip's index as configured (PIP_INDEX_URL, PIP_NO_INDEX, ...), as binary wheels where
# there are any, so the image needs no compiler; nothing is cached. Bytecode is compiled now: the root
# filesystem is read-only when the image runs.
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: $0 WHEEL VENV" >&2
  exit 2
fi
wheel=$1
venv=$2
python=${PYTHON:-python3}

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --no-input --prefer-binary \
  --compile "$wheel"
"$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null

# what the image's entrypoint runs, both roles, from outside any source tree
cd /
"$venv/bin/kubearq" --help >/dev/null
"$venv/bin/kubearq" worker --help >/dev/null
"$venv/bin/python" -c "import kubearq.operator, kubearq.worker, kubearq.core"
echo "kubearq installed in $venv"
