#!/usr/bin/env bash
# Creates ./.venv and installs kfold-ray into it. Safe to run again: it only does what is missing.
# Used by the README's commands, by .ci/run and by every node of cluster.yaml.
#
#   bash scripts/setup.sh          everything kfold-ray and its tests need (CI, development)
#   bash scripts/setup.sh --node   only what a Ray cluster node runs: torch, Ray (default and train
#                                  extras), kfold-ray and Detectron2; no test extras, no chromium,
#                                  no prometheus
#
# Every package comes at the version pinned by constraints.txt (pip install -c), the versions CI
# tested, on a fresh machine and on every cluster node alike. pyproject.toml holds the ranges;
# after changing one, regenerate the pins with `bash scripts/lock.sh`.
#
#   KFOLD_RAY_DETECTRON2=auto|official|pypi-sdist   how to install Detectron2 (default auto; see
#                                                  scripts/install_detectron2.py)
#   PYTHON=...                                     interpreter for a new .venv (default python3.11,
#                                                  else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") mode=dev ;;
  --node) mode=node ;;
  -h | --help) sed -n '2,17p' "$0" | cut -c3-; exit 0 ;;
  *) echo "usage: bash scripts/setup.sh [--node]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# The report page and the Ray dashboard are tested in a real headless browser: Debian's
# chromium, driven by Playwright (never `playwright install`, which downloads a browser build from
# outside the registries). The fold metrics are tested through a real Prometheus server:
# Debian's prometheus (the same server `ray metrics launch-prometheus` downloads on a cluster).
apt_install() {  # apt_install COMMAND PACKAGE [apt-get options]: install PACKAGE unless COMMAND exists
  local cmd=$1 package=$2
  shift 2
  command -v "$cmd" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing $package (tests in a browser / through Prometheus)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" "$package" >/dev/null; } \
      || echo "[setup] warning: could not install $package; the tests that need it will fail" >&2
  else
    echo "[setup] warning: no $package; the tests that need it are skipped here and fail under CI (apt-get install $package)" >&2
  fi
}
if [ "$mode" = dev ]; then
  apt_install chromium chromium
  # The server alone: none of the exporters its package recommends.
  apt_install prometheus prometheus --no-install-recommends
fi

# Re-run the installs only when the dependency list, the pins or the mode changed since the last
# successful set-up.
stamp=.venv/.kfold-ray-setup
inputs=(pyproject.toml constraints.txt scripts/setup.sh scripts/install_detectron2.py)
want=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)-$mode
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing into .venv (first time: a few minutes; torch is large)" >&2
# torch first: its builds lie on this machine's disk; elsewhere pip downloads them. torchvision
# comes with it because detectron2 needs it and it must match torch exactly (both pinned).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  "${pip[@]}" install -c constraints.txt torch torchvision 2> >(grep -v "^WARNING: Location" >&2)
fi
if [ "$mode" = node ]; then
  "${pip[@]}" install -c constraints.txt -e . 2> >(grep -v "^WARNING: Location" >&2)
else
  "${pip[@]}" install -c constraints.txt -e ".[test]" 2> >(grep -v "^WARNING: Location" >&2)
fi
# Its pip runs (Detectron2's requirements) honour the same pins through PIP_CONSTRAINT.
PIP_CONSTRAINT=constraints.txt .venv/bin/python scripts/install_detectron2.py
echo "$want" > "$stamp"
echo "[setup] ready: .venv ($mode)" >&2
