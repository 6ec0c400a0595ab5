"""The Maze service (welfare.v1.Maze)."""

from __future__ import annotations

from welfare_server.server.proto import maze_pb2_grpc


class MazeService(maze_pb2_grpc.MazeServicer):
    def __init__(self, state):
        self.state = state
