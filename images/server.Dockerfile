# GPU inference server: loraplex serve on PyPI's CUDA build of torch, from locks/server-cuda.txt
# (the torch, Triton and transformers versions the test suite runs). No base image brings torch.
# Build from the repo root: docker build -f images/server.Dockerfile -t loraplex-server .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The locked set first: this layer is rebuilt only when the lock changes.
COPY locks/server-cuda.txt /tmp/requirements.txt
RUN python -m venv /opt/loraplex \
    && /opt/loraplex/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY loraplex loraplex
COPY server server
COPY kernels kernels
COPY operator operator
COPY e2e/cluster e2e/cluster
RUN /opt/loraplex/bin/pip install --no-deps --no-build-isolation . \
    && /opt/loraplex/bin/pip check

FROM python:3.11.11-slim-bookworm
# Triton compiles its small CUDA launcher stubs with the system C compiler the first time a kernel
# runs on a GPU (triton/runtime/build.py), so gcc stays; nothing else to build with.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin loraplex \
    && mkdir -p /cache \
    && chown 1000:1000 /cache
COPY --from=build /opt/loraplex /opt/loraplex
# The operator mounts its cache volume at /cache (operator/render/deployment.py): every cache lives there.
ENV PATH=/opt/loraplex/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    ADAPTER_CACHE_DIR=/cache/adapters \
    TRITON_CACHE_DIR=/cache/triton \
    DEVICE=cuda \
    PORT=8080
VOLUME ["/cache"]
USER 1000
EXPOSE 8080
ENTRYPOINT ["loraplex", "serve"]
