#!/usr/bin/env bash
# Build the four images and push them to this deployment's ECR repositories (RagRegistry).
#   ./push-images.sh <region> [tag]
# Environment: PREFIX (the app's prefix, default rag), EMBEDDER_PLACEMENT (cpu or gpu, as
# the app's embedderPlacement), EMBEDDER_MODEL (default thenlper/gte-base, as the app's
# embedderModel), HF_TOKEN (Mistral's weights are gated; read as a build secret).
set -euo pipefail
region=${1:?usage: push-images.sh <region> [tag]}
tag=${2:-latest}
prefix=${PREFIX:-rag}
placement=${EMBEDDER_PLACEMENT:-cpu}
model=${EMBEDDER_MODEL:-thenlper/gte-base}
case "$placement" in
    cpu) torch=https://download.pytorch.org/whl/cpu ;;
    gpu) torch=https://download.pytorch.org/whl/cu128 ;;
    *) echo "EMBEDDER_PLACEMENT is cpu or gpu" >&2; exit 2 ;;
esac

account=$(aws sts get-caller-identity --query Account --output text)
registry="$account.dkr.ecr.$region.amazonaws.com"
aws ecr get-login-password --region "$region" \
    | docker login --username AWS --password-stdin "$registry"
cd "$(dirname "$0")/../.."  # the repository root: every Dockerfile builds from it

build_and_push() {
    local service=$1
    shift
    local image="$registry/$prefix/$service:$tag"
    DOCKER_BUILDKIT=1 docker build --platform linux/amd64 -t "$image" "$@" .
    docker push "$image"
}

build_and_push gateway -f services/gateway/Dockerfile
build_and_push retriever -f services/retriever/Dockerfile
build_and_push embedder -f services/embedder/Dockerfile \
    --build-arg TORCH_INDEX_URL="$torch" --build-arg EMBEDDER_MODEL="$model"
build_and_push generator -f services/generator/Dockerfile.vllm --secret id=hf_token,env=HF_TOKEN
