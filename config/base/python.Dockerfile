# Python 3.11 assembled from Debian packages when no python:3.11-alpine is at hand.
# Built by `rumi build` (broker/containers/images.py): the context's rootfs.tar holds python3.11, its
# shared-library closure, CA certificates and /etc/passwd with user rumi (10001). No shell:
# every command here and in images built on top must be exec-form.
ARG RUMI_PREFIX=rumi
FROM scratch AS assemble
ARG RUMI_PREFIX
LABEL io.rumi.prefix=${RUMI_PREFIX} io.rumi.stage=assemble
ADD rootfs.tar /
# Byte-compile the stdlib with the image's own interpreter (same paths, same version).
RUN ["/usr/bin/python3.11", "-m", "compileall", "-q", "-j", "0", "/usr/lib/python3.11"]

# One layer: the compiled stdlib without the build step's leftovers.
FROM scratch
COPY --from=assemble / /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/rumi
CMD ["/usr/bin/python3.11"]
