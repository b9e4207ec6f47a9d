"""Model state on the wire: safetensors bytes, never pickle.

Unpickling runs code chosen by whoever wrote the bytes, so a coordinator that unpickled updates
would hand every board in the fleet a shell on the server. safetensors is a JSON header plus raw
little-endian buffers: parsing it can fail, but it cannot execute anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load, save

from bitfleet.protocol.errors import ProtocolError

__all__ = ["pack_state", "unpack_state"]


def pack_state(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize a state dict (any device, any layout) to safetensors bytes.

    Tensors are detached, moved to the CPU and made contiguous; ones that share storage (tied
    weights, views of one buffer) are copied, since safetensors refuses aliased tensors.
    """
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state must map str to torch.Tensor, got {name!r}: {type(tensor)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        flat[name] = t
    return save(flat, metadata=dict(metadata) if metadata is not None else None)


def unpack_state(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into CPU tensors; ProtocolError("bad_tensors") if they are not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_tensors", f"expected bytes, got {type(data).__name__}")
    try:
        return load(bytes(data))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # SafetensorError, and pyo3's PanicException is no Exception
        raise ProtocolError("bad_tensors", f"not a safetensors blob: {exc}"[:300]) from None
