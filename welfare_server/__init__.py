"""welfare_server: a steering inference server with a C++ core (see docs/architecture.md)."""

__version__ = "0.1.0"
