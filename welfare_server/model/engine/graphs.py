"""CUDA-graph capture of a step function, keyed by the arguments that fix its shapes.

The step function must read only fixed buffers (its inputs are copied into them before a replay)
and have every shape determined by its key; then one capture per key is replayed for every later
call. Captures share one memory pool (the graphs never run concurrently).
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class GraphCache:
    """step(*key) -> tensor, captured once per key on first use and replayed afterwards."""

    def __init__(self, step: Callable[..., torch.Tensor]):
        self.step = step
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def keys(self):
        return self._graphs.keys()

    def run(self, key: tuple) -> torch.Tensor:
        """The step's output for `key` (a tensor the next replay of the same key overwrites)."""
        entry = self._graphs.get(key)
        if entry is None:
            # Warm up on a side stream (Triton JIT, cuBLAS handles), then capture. Capture per key
            # takes milliseconds, not a compilation.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step(*key)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.step(*key)
            entry = self._graphs[key] = (graph, out)
        graph, out = entry
        graph.replay()
        return out
