"""The generation engine: per-request steering, continuous batching, its own KV cache and loop.

Clients (the maze rollouts, the concept-vector pipeline, the gRPC server) use only these names:

  Engine, EngineConfig                 the loop and its limits (loop.py, config.py)
  Request, SamplingParams, RequestOutput, RequestHandle, RequestRefused
                                       requests and ALL their validation (requests.py)
  MonitorSpec, SteeringSpec, SteeringTerm, Scope, SteeringError
                                       steering and monitors (model.steering)
  Taps                                 per-(layer, point) steer/monitor/capture taps (taps.py)
  CaptureResult                        class sums of last-token residuals (Engine.capture)

Inside: adapter.py (per-family model adapter), attention.py, sampling.py (on tensors), graphs.py
(CUDA-graph capture of a step function). docs/engine.md describes the loop, its buffers and limits.
"""

from welfare_server.model.engine.config import EngineConfig
from welfare_server.model.engine.loop import CaptureResult, Engine, RequestHandle
from welfare_server.model.engine.requests import QueueFull, Request, RequestOutput, RequestRefused, SamplingParams
from welfare_server.model.engine.sampling import gumbel_noise
from welfare_server.model.engine.taps import Taps
from welfare_server.model.steering import MonitorSpec, Scope, SteeringError, SteeringSpec, SteeringTerm

__all__ = ["Engine", "EngineConfig", "CaptureResult", "Request", "SamplingParams", "RequestOutput", "RequestHandle",
           "RequestRefused", "QueueFull", "MonitorSpec", "SteeringSpec", "SteeringTerm", "Scope", "SteeringError", "Taps",
           "gumbel_noise"]
