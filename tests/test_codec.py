"""Tensors round-trip exactly; anything malformed or oversized is rejected with a clear error."""

from __future__ import annotations

import pytest
import torch

from proto import blocks_pb2
from proto.codec import TensorDecodeError, TensorLimits, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_round_trip_preserves_values_dtype_and_shape(dtype: torch.dtype) -> None:
    original = (torch.randn(2, 3, 5) * 10).to(dtype)
    decoded = decode_tensor(encode_tensor(original))
    assert decoded.dtype == dtype
    assert decoded.shape == original.shape
    assert torch.equal(decoded, original)


def test_rejects_byte_count_that_does_not_match_shape() -> None:
    message = encode_tensor(torch.zeros(2, 4))
    message.data = message.data[:-4]
    with pytest.raises(TensorDecodeError, match="needs 32"):
        decode_tensor(message)


def test_rejects_unknown_dtype_nan_and_oversize() -> None:
    with pytest.raises(TensorDecodeError, match="unsupported dtype"):
        decode_tensor(blocks_pb2.Tensor(data=b"", dtype="object", shape=[0]))
    with pytest.raises(TensorDecodeError, match="NaN"):
        decode_tensor(encode_tensor(torch.tensor([1.0, float("nan")])))
    with pytest.raises(TensorDecodeError, match="exceeds the limit"):
        decode_tensor(encode_tensor(torch.zeros(1024)), TensorLimits(max_bytes=1000))
    with pytest.raises(TensorDecodeError, match="rank"):
        decode_tensor(blocks_pb2.Tensor(data=b"", dtype="float32", shape=[]))
