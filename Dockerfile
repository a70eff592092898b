# layermoe_ds on NVIDIA GPUs. Versions live in one place each: the base image and CUDA arch list here (ARGs),
# torch in scripts/install.sh, DeepSpeed and the rest in setup.cfg — the same install script the Makefile and CI use.
#   docker build -t layermoe_ds .
#   docker run --gpus all --ipc=host -v "$PWD/data:/data" -v "$PWD/runs:/runs" layermoe_ds evaluate --model ...
#   docker run --gpus all --ipc=host ... --entrypoint deepspeed layermoe_ds --module layermoe_ds.launchers.stage1 \
#       --config /runs/x/stage1.yaml --deepspeed_config stage1_zero2.json
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# The CUDA build of torch matching the base image, and the GPU architectures DeepSpeed's ops are compiled for
# (8.0 A100, 8.6 A10/RTX 30xx, 8.9 L4/L40, 9.0 H100/H200).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG EXTRAS=mpi

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    PATH=/opt/venv/bin:${PATH}

# Distribution packages are not version-pinned: the base image tag pins the distribution release.
# pdsh + ssh for `deepspeed --launcher pdsh`, Open MPI for mpirun / `--launcher openmpi`, numactl for core binding.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv g++ git ninja-build pdsh openssh-client openssh-server \
        openmpi-bin libopenmpi-dev numactl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --shell /bin/bash layermoe \
    && mkdir -p /opt/venv /opt/layermoe_ds /data /runs \
    && chown layermoe:layermoe /opt/venv /opt/layermoe_ds /data /runs
USER 1000:1000
WORKDIR /opt/layermoe_ds

# Install first from the files the install reads, so editing code does not rebuild torch and DeepSpeed's ops.
COPY --chown=layermoe:layermoe setup.cfg pyproject.toml constraints.txt README.md ./
COPY --chown=layermoe:layermoe scripts/install.sh scripts/install.sh
COPY --chown=layermoe:layermoe layermoe_ds/__init__.py layermoe_ds/__init__.py
# DS_BUILD_FUSED_ADAM: compile FusedAdam now (no nvcc wait at the first step); ds_report shows what is built.
RUN DS_BUILD_FUSED_ADAM=1 TORCH_INDEX_URL=${TORCH_INDEX_URL} bash scripts/install.sh /opt/venv "${EXTRAS}" \
    && ds_report

# The package itself, installed as users install it (not editable): launchers and DeepSpeed configs are in it.
COPY --chown=layermoe:layermoe . .
# `python -I`: the installed package, not this directory's copy.
RUN pip install --no-deps . && layermoe --help >/dev/null \
    && python -I -c "import layermoe_ds.launchers.stage1, layermoe_ds.training.engine as e; assert e.SHIPPED_CONFIGS.is_dir()"

ENTRYPOINT ["layermoe"]
CMD ["--help"]
