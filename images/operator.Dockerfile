# The operator: kopf handlers only. No torch, no model code: it talks to pods over HTTP.
# Installs locks/operator.txt (the `operator` extra, resolved with the rest of the stack).
# Build from the repo root: docker build -f images/operator.Dockerfile -t loraplex-operator .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY locks/operator.txt /tmp/requirements.txt
RUN python -m venv /opt/loraplex \
    && /opt/loraplex/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY loraplex loraplex
COPY server server
COPY kernels kernels
COPY operator operator
COPY e2e/cluster e2e/cluster
# --no-deps: the distribution's own requirements are the server's (torch, transformers); the lock
# holds the build backend too (setuptools, wheel), so nothing unpinned is fetched to build.
RUN /opt/loraplex/bin/pip install --no-deps --no-build-isolation . \
    && /opt/loraplex/bin/python -c "import loraplex.operator.main"

FROM python:3.11.11-slim-bookworm
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin loraplex
COPY --from=build /opt/loraplex /opt/loraplex
ENV PATH=/opt/loraplex/bin:$PATH PYTHONUNBUFFERED=1
USER 1000
EXPOSE 8080
ENTRYPOINT ["loraplex", "operator"]
