"""ONNX back into PyTorch: a model another framework exported, converted by onnx2torch and evaluated
(compare.port --onnx-import), closing a port such as TensorFlow -> ONNX -> PyTorch.

It runs in the tox env onnx-import, not in the torch env: onnx2torch imports torchvision, and PyPI's torchvision
needs a PyTorch build of its own (2.14.1 with CUDA, about 5.6 GB), where the torch env pins the 2.13.0 CPU build.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import onnx2torch
import torch

from common.onnx import batches


def importer() -> str:
    return f"onnx2torch {version('onnx2torch')} (torch {torch.__version__})"


def logits(path: str, images: np.ndarray, layout: str, batch_size: int = 1000) -> np.ndarray:
    """The logits of images (NCHW) through the ONNX model at path converted into a torch.nn.Module, in eval mode on
    the CPU; its input takes them in `layout` ("NCHW" or "NHWC"), float32."""
    module = onnx2torch.convert(path).eval()
    with torch.no_grad():
        out = [module(torch.from_numpy(x)).numpy() for x in batches(images, layout, np.float32, batch_size)]
    return np.concatenate(out)
