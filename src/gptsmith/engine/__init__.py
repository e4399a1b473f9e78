"""Inference engine: `Engine` (batched, streaming generation with a KV cache) and `BatchScheduler`
(continuous batching for the server). See core.py, runners.py and scheduler.py."""

from gptsmith.engine.core import Batch, Engine, Sequence, generate_cli
from gptsmith.engine.params import Completion, SamplingParams, StreamEvent
from gptsmith.engine.scheduler import BatchScheduler, GenerationRequest
from gptsmith.engine.text import IncrementalDecoder, StopMatcher

__all__ = ["Batch", "BatchScheduler", "Completion", "Engine", "GenerationRequest", "IncrementalDecoder",
           "SamplingParams", "Sequence", "StopMatcher", "StreamEvent", "generate_cli"]
