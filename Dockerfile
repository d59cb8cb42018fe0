# forwarder: one per Docker host, with the engine's socket mounted (read-only; access to it
# is root-equivalent, see the README's "Security" section).
#   docker build -t forwarder:0.1.0 .
#   docker run -d --name forwarder \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro \
#     -v /var/lib/docker/containers:/var/lib/docker/containers:ro \
#     --pid=host --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
#     -v /var/lib/forwarder:/var/lib/forwarder \
#     -e FORWARD_SERVER=tcp://fluentd.example:24224 \
#     forwarder:0.1.0
# The engine's containers/ directory, read-only at the same path, lets forwarder read the
# json-file logs from disk ([docker] log_source = "auto"), sparing dockerd; with another
# data-root mount <data-root>/containers at the same path (or anywhere, and set [docker]
# containers_dir). Without it, logs come through the API. The host's PID and cgroup
# namespaces and its cgroup tree let [stats] read the cgroup files instead of asking the
# Stats API (without them, "auto" asks the API). See the README's "Reading logs from disk".
# The built-in config (conf/docker.toml) takes the aggregator from FORWARD_SERVER; mount your
# own over /etc/forwarder/forwarder.toml for more.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY forwarder ./forwarder
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY conf/docker.toml /etc/forwarder/forwarder.toml
VOLUME ["/var/lib/forwarder"]
# The positions and disk buffer live in /var/lib/forwarder: keep it on the host, so that a new
# forwarder container resumes where the old one stopped.
STOPSIGNAL SIGTERM
# Liveness on [service] http_listen (127.0.0.1:24231 by default, inside the container). The
# slim image has no curl: Python's urllib does the request; a 503 or no answer fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:24231/healthz', timeout=4)"]
ENTRYPOINT ["forwarder"]
CMD ["run", "--config", "/etc/forwarder/forwarder.toml"]
