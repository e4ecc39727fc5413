#!/usr/bin/env bash
# The console's end-to-end check: the real app in tmux against the stack (queue, services,
# jobs on screen), its CPU share at 1 Hz, and --web screenshotted in headless Chromium.
# Uses the stack ./install.sh started, or a temporary one (--start-stack forces that).
# Writes var/console-tmux.txt, var/console-cpu.txt and var/console-web.png.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./.venv/bin/python scripts/console_check.py "$@"
