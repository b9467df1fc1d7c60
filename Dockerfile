# One image for every xLLM service; docker-compose.yml picks the service with its command
# (`python -m services.<name>`). CPU build; GPU hosts swap the torch index and Mooncake wheel.
FROM python:3.11-slim

# libibverbs1: Mooncake's transfer engine links it, even for TCP transfers.
# g++: xllm.ops compiles its native CPU kernels on first use (torch falls back without them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 g++ \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, pinned (as in the Makefile) and from the CPU index, so that nothing later
# pulls a multi-GB CUDA build; its own layer, so code changes do not download it again.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
# xgrammar (structured output) without triton, its GPU-only requirement (as in the Makefile).
ARG XGRAMMAR_VERSION=0.2.9
RUN pip install --no-deps "xgrammar==${XGRAMMAR_VERSION}"

COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
# Editable, as in development: the kernels' C++ sources and every subpackage are used from
# the tree itself, so the image runs exactly the code the tests ran. ninja drives the
# kernels' build (torch's cpp_extension).
RUN pip install -e ".[embedded,mooncake]" ninja

CMD ["xllm", "--help"]
