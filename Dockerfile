# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target bot    -t masque-bot .     (slim Python: the Discord bot and the CLI)
#   docker build --target engine -t masque-engine .  (CUDA PyTorch: the model server)
# Secrets (DISCORD_TOKEN, MASQUE_ENGINE_API_KEY) come from the environment at run time, never the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# ---------------------------------------------------------------- wheel
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md alembic.ini ./
COPY bot ./bot
COPY engine ./engine
COPY migrations ./migrations
COPY personas ./personas
RUN python -m build --wheel --outdir /dist

# ---------------------------------------------------------------- bot
FROM ${PYTHON_IMAGE} AS bot
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg libopus0 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 masque
COPY --from=wheel /dist/*.whl /tmp/
RUN for whl in /tmp/masque-*.whl; do pip install --no-cache-dir "${whl}[postgres,voice]"; done \
    && rm /tmp/*.whl
USER 10001
ENV MASQUE_DATABASE_URL=sqlite+aiosqlite:////home/masque/masque.db
# Point the bot at the engine: MASQUE_ENGINE_URL=http://engine:8000/v1
CMD ["masque-bot"]

# ---------------------------------------------------------------- engine
FROM ${TORCH_IMAGE} AS engine
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg espeak-ng \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 masque
COPY --from=wheel /dist/*.whl /tmp/
RUN for whl in /tmp/masque-*.whl; do pip install --no-cache-dir "${whl}[engine]"; done \
    && rm /tmp/*.whl
USER 10001
ENV MASQUE_CACHE_DIR=/home/masque/.cache/masque
EXPOSE 8000
# The gpu preset loads hub models; mount a volume on the cache to keep them between runs.
# Binding 0.0.0.0 requires MASQUE_ENGINE_API_KEY.
CMD ["masque-engine", "--preset", "gpu", "--host", "0.0.0.0", "--port", "8000"]
