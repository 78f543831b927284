# megagrow for A100/H100 clusters: CUDA PyTorch, flash-attn 2, apex (fused kernels), DeepSpeed.
#
#   docker build -t megagrow:cu124 .
#   docker build -t megagrow:h100 --build-arg TORCH_CUDA_ARCH_LIST=9.0 --build-arg MAX_JOBS=32 .
#
# Build and multi-node launch: docker/README.md.

# The devel variant carries nvcc and the CUDA headers, which apex and flash-attn compile against;
# the runtime variant cannot build them.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

# Compute capabilities the CUDA extensions are compiled for: 8.0 = A100, 9.0 = H100/H200.
# Fewer architectures build faster and give a smaller image.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
# Parallel compiler jobs; each nvcc job of flash-attn can take several GB of RAM.
ARG MAX_JOBS=8
ARG FLASH_ATTN_VERSION=2.7.4.post1
ARG DEEPSPEED_VERSION=0.16.4
ARG SENTENCEPIECE_VERSION=0.2.0
# apex has no PyPI release with CUDA extensions; build a fixed tag from source.
ARG APEX_REF=24.04.01

ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git fetches apex; pdsh and openssh let the deepspeed launcher reach the other nodes of a
# hostfile. Their versions follow the base image's Ubuntu release, which the tag above fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git pdsh openssh-client openssh-server \
    && rm -rf /var/lib/apt/lists/*

# ninja makes the extension builds parallel (MAX_JOBS); pybind11 builds megagrow's C++ helpers.
RUN pip install --no-cache-dir "packaging==24.2" "ninja==1.11.1.3" "pybind11==2.13.6" "wheel==0.45.1"

# Against the torch already in the image (--no-build-isolation), so the kernels match its ABI.
# One layer per heavy build, so changing a later step never recompiles the kernels.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# --cpp_ext/--cuda_ext build apex's fused kernels (FusedAdam, fused RMSNorm); without them
# apex installs as pure Python and megagrow would fall back to the torch paths.
RUN git clone --depth 1 --branch "${APEX_REF}" https://github.com/NVIDIA/apex.git /tmp/apex \
    && pip install --no-cache-dir --no-build-isolation \
       --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" /tmp/apex \
    && rm -rf /tmp/apex

RUN pip install --no-cache-dir "deepspeed==${DEEPSPEED_VERSION}" "sentencepiece==${SENTENCEPIECE_VERSION}"

WORKDIR /workspace/megagrow
COPY . .
# Builds megagrow._helpers (csrc/) and installs the hf extras used by the conversion tools;
# their versions are bounded in setup.py.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-build-isolation ".[hf]"

# megagrow falls back to the torch paths when a fused kernel is missing, which would cost speed
# unnoticed for a whole run: fail the build instead. find_spec locates the compiled modules
# without loading them, since no GPU driver is present while building.
# hadolint ignore=DL3059
RUN python -c "import importlib.util as u; missing = [m for m in ('amp_C', 'fused_layer_norm_cuda', \
'flash_attn_2_cuda', 'deepspeed', 'megagrow._helpers') if u.find_spec(m) is None]; assert not missing, missing"

CMD ["bash"]
