# The eventpipe image: one image, every component; the command picks the role
# (`collector`, `loader --stream all`, `migrate`, `partitions maintain`).
#   docker build -t eventpipe:latest .
# Published as ghcr.io/eventpipe/eventpipe:<version> (the version of pyproject.toml).

# Build the wheel in a throw-away stage, so the runtime image carries no build
# tools and no source tree.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ingest ingest
COPY consumers consumers
COPY sql sql
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EVENTPIPE_STATE_DIR=/var/lib/eventpipe \
    EVENTPIPE_LOG_FORMAT=json
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Non-root, fixed uid (manifests set runAsUser 10001); the state dir (the
# collector's spool) is the only place it writes, and it is a volume.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/eventpipe --create-home eventpipe
USER 10001
WORKDIR /var/lib/eventpipe
VOLUME ["/var/lib/eventpipe"]
EXPOSE 8780 9108
ENTRYPOINT ["eventpipe"]
CMD ["--help"]
