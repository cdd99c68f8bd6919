"""The device the engine tests load their models on: the CPU, or what `LLMOS_TEST_DEVICE` names
(`cuda`, `cuda:1`), so the same tests check the engine on a GPU (`tools/gpu_check.sh`)."""

from __future__ import annotations

import os

import torch

ENGINE_DEVICE = torch.device(os.environ.get("LLMOS_TEST_DEVICE", "cpu"))
