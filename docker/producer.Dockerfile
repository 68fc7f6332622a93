# syntax=docker/dockerfile:1
# Light image without torch: producers (the Python API and `refinery submit`), the
# callbacks worker (`refinery worker --queues callbacks`) and Flower.
#   docker build -f docker/producer.Dockerfile -t face-refinery .
FROM python:3.12-slim

ARG FLOWER_SPEC="flower>=2.0,<3"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
COPY refiner ./refiner
COPY cli ./cli
# The base install has no torch; the callbacks worker never imports it.
RUN pip install . "$FLOWER_SPEC"

# /data holds Flower's persistent state (--db=/data/flower.db), a volume in compose.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin refinery \
    && mkdir -p /data \
    && chown refinery:refinery /data
VOLUME ["/data"]
USER 10001:10001

CMD ["refinery", "--help"]
