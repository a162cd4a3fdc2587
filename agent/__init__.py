"""dinet agent: submit inference requests and stream their results (Python API and ``dinet-agent``).

    from agent import Agent
    async with Agent("amqp://guest:guest@127.0.0.1:5672/") as agent:
        result = await agent.complete(model="tiny", prompt="Hello", max_new_tokens=16)
"""

from agent.client import Agent, Generation
from agent.config import AgentConfig
from agent.results import Chunk, GenerationResult, NodeTiming

__all__ = ["Agent", "AgentConfig", "Chunk", "Generation", "GenerationResult", "NodeTiming"]
