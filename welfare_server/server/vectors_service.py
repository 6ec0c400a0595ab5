"""The Vectors service (welfare.v1.Vectors)."""

from __future__ import annotations

from welfare_server.server.proto import vectors_pb2_grpc


class VectorsService(vectors_pb2_grpc.VectorsServicer):
    def __init__(self, state):
        self.state = state
