# One small image for the zchat broker and its clients.
#
#   docker build -t zchat .                 (docker-compose.yml does this for you)
#   docker run --rm zchat                   the broker (zchat-broker, the default command)
#   docker run --rm -it zchat zchat-client  a client
#
# Two stages: the first installs zchat into a virtualenv; the second copies
# only that virtualenv onto a fresh base, so no source tree, pip cache or
# packaging tool of the build is left in the image that runs.
FROM python:3.11-slim AS build
# Unset for users: pip then installs from PyPI as usual. zchat's CI sets them
# to build offline from a wheelhouse in the build context.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
COPY . /src
RUN python -m venv --without-pip /opt/zchat \
 && python -m pip --python /opt/zchat/bin/python install \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location /src

FROM python:3.11-slim
COPY --from=build /opt/zchat /opt/zchat
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin zchat \
 && mkdir /data /keys && chown zchat:zchat /data /keys
# Unbuffered: every chat line reaches `docker logs` the moment it is printed.
# The broker keeps the room's history in /data/history.db: mount a volume there
# to keep it across containers (docker-compose.yml does).
ENV ZCHAT_DATA_DIR=/data \
    PATH=/opt/zchat/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER zchat
WORKDIR /home/zchat
# 5555 input (client requests), 5556 broadcast (room events). The operator's
# control endpoint stays on the container's loopback: `docker exec ... zchat-admin`.
EXPOSE 5555 5556
# zchat-broker stops cleanly on SIGTERM, also as PID 1 (docker stop, compose down).
CMD ["zchat-broker"]
