# CPU inference server for kind and CPU-only clusters (tiny models, demos, CI-like runs), from
# locks/server-cpu.txt: the GPU image's set with the CPU wheel of torch and no CUDA wheels.
# Build from the repo root: docker build -f images/server-cpu.Dockerfile -t loraplex-server-cpu .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY locks/server-cpu.txt /tmp/requirements.txt
# torch==X+cpu lives on PyTorch's CPU index; every other pin is on PyPI. --require-hashes holds both.
RUN python -m venv /opt/loraplex \
    && /opt/loraplex/bin/pip install --require-hashes --no-deps \
        --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt
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
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin loraplex \
    && mkdir -p /cache \
    && chown 1000:1000 /cache
COPY --from=build /opt/loraplex /opt/loraplex
# The operator mounts its cache volume at /cache (operator/render/deployment.py): every cache lives there.
ENV PATH=/opt/loraplex/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    ADAPTER_CACHE_DIR=/cache/adapters \
    TRITON_CACHE_DIR=/cache/triton \
    DEVICE=cpu \
    PORT=8080
VOLUME ["/cache"]
USER 1000
EXPOSE 8080
ENTRYPOINT ["loraplex", "serve"]
