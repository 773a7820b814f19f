# Redis from Debian's package, for machines that cannot pull redis:7.4.1-alpine (the compose
# default): `make compose-test` builds it on its local Debian base and sets PAIRLOOP_REDIS_IMAGE.
#
#   docker build -f docker/redis.Dockerfile --build-arg DEBIAN_IMAGE=<a Debian 12 image> -t pairloop/redis-debian:7 .
#
# The compose service's command (append-only file under /data, the password from its secret
# file) and health check (redis-cli ping with that password) are the same for both images;
# --protected-mode no there, as the official image's entrypoint adds, since the stack's other
# containers reach Redis over the compose network. The HEALTHCHECK below is for a Redis run
# without a password; compose replaces it.
ARG DEBIAN_IMAGE=debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
RUN apt-get -o Acquire::Retries=3 update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
HEALTHCHECK --interval=10s --timeout=3s --retries=5 CMD ["redis-cli", "ping"]
CMD ["redis-server", "--protected-mode", "no", "--dir", "/data"]
