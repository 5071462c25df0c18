#!/usr/bin/env bash
# Deletes the kind cluster e2e/kind-up.sh created (and everything in it).
set -euo pipefail
CLUSTER=${SLAM_KIND_CLUSTER:-slam-e2e}
command -v kind >/dev/null || { echo "kind-down: kind is not installed" >&2; exit 2; }
kind delete cluster --name "$CLUSTER"
