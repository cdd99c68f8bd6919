#!/bin/sh
# The engine on a GPU, in one run (tools/gpu/run.sh): the device as NVML sees it, one decode step three
# ways (torch's operators, the engine's Triton kernels, CUDA graphs), the engine's tests with their
# models on CUDA, and `llmos bench --fixed` through a whole suite whose worker runs on the GPU, against
# transformers' generate() on the same GPU, with random-weight models made there from configs.
#   with network to PyPI:         bash tools/gpu/prepare.sh       (fills .gpu/, git-ignored)
#   on the GPU machine, from a checkout holding .gpu/ and the Python client's generated stubs
#   (clients/python/llmos_client/v1, made by `make`):  OUT=<dir> sh tools/gpu_check.sh
set -eu
exec bash "$(dirname "$0")/gpu/run.sh"
