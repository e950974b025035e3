# syntax=docker/dockerfile:1
# aiaas services image: `python -m services.<registry|inference|gateway|monitor>` and the `aiaas` CLI.
#
#   docker build -t ghcr.io/aiaas/aiaas:0.1.0 .
#
# CUDA variant (for deploy/k8s/overlays/gpu): the CUDA torch wheels bring their own CUDA
# runtime, so only the wheel index changes; the node needs the NVIDIA driver and container
# toolkit (or the GPU operator):
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#     -t ghcr.io/aiaas/aiaas:0.1.0-cuda .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/aiaas
ENV PATH=/opt/aiaas/bin:$PATH
# torch first, from the wheel index that picks CPU or CUDA; the project then finds it installed.
RUN pip install 'torch>=2.3,<2.14' --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY clients/python ./clients/python
COPY aiaas ./aiaas
COPY services ./services
# The client distribution (aiaas-client, which the server requires) and the server, in one resolve.
RUN pip install ./clients/python '.[onnx]' \
 && python -m compileall -q /opt/aiaas/lib \
 && pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="aiaas" \
      org.opencontainers.image.description="Model registry, KServe v2 inference, gateway and monitor over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
# The uid/gid the Kubernetes manifests run as (runAsUser / runAsGroup / fsGroup 10001).
RUN groupadd --system --gid 10001 aiaas \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin aiaas \
 && mkdir -p /data /var/cache/aiaas \
 && chown 10001:10001 /data /var/cache/aiaas
COPY --from=build /opt/aiaas /opt/aiaas
# The root filesystem may be read-only: everything written goes to /tmp, /data or /var/cache/aiaas.
ENV PATH=/opt/aiaas/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/aiaas
USER 10001:10001
WORKDIR /tmp
# gateway, registry, inference, monitor, monitor's Prometheus endpoint.
EXPOSE 8001 50051 50052 50053 9464
CMD ["python", "-m", "services.gateway"]
