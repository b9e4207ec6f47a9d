"""`--verify`: the ONNX file in onnxruntime against the PyTorch quantized model it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .runtime import run_batches, session


def verify_export(path: Path, model: nn.Module, test: tuple[np.ndarray, np.ndarray]) -> dict:
    """Top-1 agreement, max |logit difference| and both accuracies on the given samples."""
    x, y = test
    onnx_logits = run_batches(session(str(path)), x)
    with torch.no_grad():
        torch_logits = model.eval()(torch.from_numpy(x)).numpy()
    return {
        "samples": len(x),
        "agree": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
        "acc_onnx": float((onnx_logits.argmax(1) == y).mean()),
        "acc_torch": float((torch_logits.argmax(1) == y).mean()),
    }
