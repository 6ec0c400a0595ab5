"""Concept vectors: extraction through the engine's capture taps, layer selection, the registry and
its formats, analyses and the report (docs/architecture.md, "Concept-vector protocol")."""

from welfare_server.vectors.types import ConceptVectors, LayerSelection, ModelIdentity, model_identity

__all__ = ["ConceptVectors", "LayerSelection", "ModelIdentity", "model_identity"]
