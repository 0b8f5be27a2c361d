# Python base from the seed's image (python:3.11-alpine) when it is present locally or may be pulled.
# Built by `rumi build` (broker/containers/images.py); it only adds Rumi's labels and a non-root user id.
ARG SEED_IMAGE=python:3.11-alpine
FROM ${SEED_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
