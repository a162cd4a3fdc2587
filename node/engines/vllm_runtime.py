"""Pre-flight check for ``--engine vllm``: is vLLM installed, and is there a CUDA device for it?

Run before anything heavy is loaded, so an operator who asked for the GPU engine on the wrong
machine gets one clear sentence instead of an import traceback minutes into start-up.
"""

from __future__ import annotations

import importlib.util


class EngineUnavailableError(RuntimeError):
    """The engine asked for cannot run on this machine; the message says what to install or change."""


def require_vllm() -> str:
    """Return the installed vLLM version.

    :raises EngineUnavailableError: vLLM is not importable, or no CUDA device is visible.
    """
    if importlib.util.find_spec("vllm") is None:
        raise EngineUnavailableError(
            "--engine vllm needs vLLM, which is not installed in this environment; install it with "
            "`pip install '.[vllm]'` on a machine with an NVIDIA GPU and CUDA, or use --engine local"
        )
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailableError(
            "--engine vllm needs a CUDA GPU, and torch sees none here (no NVIDIA driver, "
            "CUDA_VISIBLE_DEVICES empty, or a CPU-only torch build); use --engine local on this machine"
        )
    try:
        import vllm
    except Exception as exc:  # installed but broken (CUDA/torch mismatch, missing libraries)
        raise EngineUnavailableError(
            f"vLLM is installed but cannot be imported ({type(exc).__name__}: {exc}); "
            "reinstall it for this machine's CUDA and torch versions"
        ) from exc
    return str(getattr(vllm, "__version__", "unknown"))
