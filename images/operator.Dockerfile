# The operator: kopf handlers only. No torch, no model code: it talks to pods over HTTP.
# Build from the repo root: docker build -f images/operator.Dockerfile -t loraplex-operator .

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY loraplex loraplex
COPY server server
COPY kernels kernels
COPY operator operator
COPY e2e/cluster e2e/cluster
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
# --no-deps: the distribution also lists the server's dependencies (torch, transformers).
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
    && pip install --no-cache-dir "kopf>=1.37,<2" "kubernetes>=29" "pydantic>=2.6,<3" "aiohttp>=3.9,<4" "pyyaml>=6" \
    && rm -rf /wheels \
    && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin loraplex
USER 1000
EXPOSE 8080
ENTRYPOINT ["loraplex", "operator"]
