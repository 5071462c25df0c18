#!/usr/bin/env bash
# Creates a kind cluster for SLAM's end-to-end tests, builds and loads the images, installs the chart with
# MinIO and applies the CPU example (or the GPU one where the host has NVIDIA GPUs).
#   e2e/kind-up.sh            then: pytest e2e/ -v      then: e2e/kind-down.sh
# Needs docker, kind, kubectl and helm. GPU nodes need the NVIDIA container toolkit on the host with docker's
# default runtime set to nvidia and accept-nvidia-visible-devices-as-volume-mounts=true (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${SLAM_KIND_CLUSTER:-slam-e2e}
NODE_IMAGE=${SLAM_KIND_NODE_IMAGE:-}  # e.g. kindest/node:v1.33.1; empty: the kind release's default

need() { command -v "$1" >/dev/null || { echo "kind-up: $1 is required" >&2; exit 2; }; }
for tool in docker kind kubectl helm; do need "$tool"; done

GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  if [ "$(docker info --format '{{.DefaultRuntime}}')" != nvidia ] \
     || ! grep -qs '^accept-nvidia-visible-devices-as-volume-mounts = true' /etc/nvidia-container-runtime/config.toml; then
    cat >&2 <<'EOF'
kind-up: GPUs found, but docker is not set up to hand them to kind nodes. Once, as root:
  nvidia-ctk runtime configure --runtime=docker --set-as-default
  nvidia-ctk config --set accept-nvidia-visible-devices-as-volume-mounts=true --in-place
  systemctl restart docker
EOF
    exit 2
  fi
fi

# Two workers: a failed node's replicas have somewhere to go. A GPU worker sees every GPU through the
# toolkit's volume-mount convention.
gpu_mount=""
if [ "$GPU" = 1 ]; then
  gpu_mount=$'  extraMounts:\n  - hostPath: /dev/null\n    containerPath: /var/run/nvidia-container-devices/all'
fi
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" ${NODE_IMAGE:+--image "$NODE_IMAGE"} --wait 120s --config - <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
$gpu_mount
- role: worker
$gpu_mount
EOF
fi
kubectl config use-context "kind-$CLUSTER"

if [ "$GPU" = 1 ]; then
  # Inside each worker: the toolkit as containerd's default runtime, then NVIDIA's device plugin.
  for node in $(kind get nodes --name "$CLUSTER" | grep worker); do
    docker exec "$node" bash -euc '
      umount -R /proc/driver/nvidia 2>/dev/null || true
      if ! command -v nvidia-ctk >/dev/null; then
        apt-get update -qq && apt-get install -y -qq curl gpg >/dev/null
        curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey \
          | gpg --dearmor -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
        curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
          | sed "s#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#" \
          > /etc/apt/sources.list.d/nvidia-container-toolkit.list
        apt-get update -qq && apt-get install -y -qq nvidia-container-toolkit >/dev/null
      fi
      nvidia-ctk runtime configure --runtime=containerd --set-as-default
      systemctl restart containerd'
    kubectl label node "$node" nvidia.com/gpu.present=true --overwrite
  done
  helm upgrade --install nvdp nvidia-device-plugin --repo https://nvidia.github.io/k8s-device-plugin \
    --namespace nvidia-device-plugin --create-namespace --wait
fi

targets="server-cpu:slam-serve:cpu operator:slam-serve:operator"
[ "$GPU" = 1 ] && targets="$targets server-cuda:slam-serve:cuda"
for t in $targets; do
  docker build --target "${t%%:*}" -t "${t#*:}" .
  kind load docker-image "${t#*:}" --name "$CLUSTER"
done

# The chart with MinIO in `default`, where the examples and their Secret slam-s3 live. The operator and MinIO
# run on the control plane, so stopping a worker (e2e/test_failover_kind.py) takes only server pods with it.
control_plane='{"node-role.kubernetes.io/control-plane": ""}'
tolerate='[{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}]'
helm upgrade --install slam charts/slam --namespace default --set minio.enabled=true \
  --set-json "operator.nodeSelector=$control_plane" --set-json "operator.tolerations=$tolerate" \
  --set-json "minio.nodeSelector=$control_plane" --set-json "minio.tolerations=$tolerate" \
  --wait --timeout 10m
kubectl wait --for=condition=complete job/minio-create-bucket --timeout=5m

if [ "$GPU" = 1 ]; then
  echo "kind-up: GPU cluster ready; create the claim slam-models with a model (docs/kubernetes.md), then"
  echo "  kubectl apply -f manifests/examples/slaminference-gpu.yaml"
fi
kubectl apply -f manifests/examples/slaminference.yaml
kubectl wait slam/smollm2 --for=jsonpath='{.status.readyReplicas}'=2 --timeout=10m
kubectl get slam,pods -o wide
echo "kind-up: ready. Run: pytest e2e/ -v"
