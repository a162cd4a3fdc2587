"""Tensors on the wire as raw bytes + dtype + shape, never pickle.

Decoding validates everything a peer could get wrong or abuse: the dtype is one of a
short allow-list, the shape has a bounded rank and non-negative dimensions, the byte
count matches the shape exactly and stays under a limit, and floating tensors hold no
NaN or infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from proto import blocks_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class TensorDecodeError(ValueError):
    """The peer sent a tensor that is malformed, too large or not finite."""


@dataclass(frozen=True)
class TensorLimits:
    """Hard bounds on what a peer may send."""

    max_bytes: int = 64 * 1024 * 1024
    max_rank: int = 4
    allow_non_finite: bool = False


DEFAULT_LIMITS = TensorLimits()


def encode_tensor(tensor: torch.Tensor) -> blocks_pb2.Tensor:
    """Serialise a CPU or GPU tensor; bfloat16 goes through its raw 16-bit pattern."""
    if tensor.dtype not in _NAMES:
        raise TypeError(f"cannot send dtype {tensor.dtype}; allowed: {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous()
    raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
    return blocks_pb2.Tensor(
        data=raw.numpy().tobytes(), dtype=_NAMES[tensor.dtype], shape=list(tensor.shape)
    )


def decode_tensor(message: blocks_pb2.Tensor, limits: TensorLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Parse and validate a tensor from a peer.

    :raises TensorDecodeError: with a message naming what was wrong.
    """
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unsupported dtype {message.dtype!r}; allowed: {sorted(DTYPES)}")
    shape = list(message.shape)
    if not 0 < len(shape) <= limits.max_rank:
        raise TensorDecodeError(f"tensor rank {len(shape)} outside 1..{limits.max_rank}")
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"negative dimension in shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > limits.max_bytes:
        raise TensorDecodeError(f"tensor of {expected} bytes exceeds the limit of {limits.max_bytes}")
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"tensor data has {len(message.data)} bytes, shape {shape} x {message.dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(bytearray(message.data), dtype=storage_dtype).reshape(shape)
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    if tensor.is_floating_point() and not limits.allow_non_finite and not torch.isfinite(tensor).all():
        raise TensorDecodeError("tensor contains NaN or infinite values")
    return tensor
