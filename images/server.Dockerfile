# GPU inference server: loraplex serve on a CUDA build of PyTorch.
# Build from the repo root: docker build -f images/server.Dockerfile -t loraplex-server .

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY loraplex loraplex
COPY server server
COPY kernels kernels
COPY operator operator
COPY e2e/cluster e2e/cluster
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/var/cache/loraplex/hf \
    LORAPLEX_CACHE=/var/cache/loraplex \
    PORT=8080
COPY --from=build /wheels /wheels
# torch comes with the base image; everything else from the wheel's requirements.
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin loraplex \
    && mkdir -p /var/cache/loraplex \
    && chown -R 1000:1000 /var/cache/loraplex
USER 1000
EXPOSE 8080
ENTRYPOINT ["loraplex", "serve"]
