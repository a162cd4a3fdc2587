"""Engines that compute a whole model with another runtime than dinet's own torch code.

- :mod:`node.engines.vllm_options`: how a dinet method and weight format become vLLM engine
  and sampling options (pure functions; importable and tested without vLLM).
- :mod:`node.engines.vllm_runtime`: the pre-flight check that vLLM and a CUDA device are there.
- :mod:`node.engines.vllm_engine`: :class:`~node.engine.Engine` over vLLM's async engine.
"""
