"""Concept vectors: extraction through the engine's capture taps, layer selection, the registry and
its formats, analyses and the report (docs/architecture.md, "Concept-vector protocol")."""

from welfare_server.vectors.formats import export_gguf, import_gguf
from welfare_server.vectors.registry import (RegistryError, VectorRegistry, load_into_engine, steering_term,
                                             steering_terms)
from welfare_server.vectors.types import ConceptVectors, LayerSelection, ModelIdentity, model_identity

__all__ = ["ConceptVectors", "LayerSelection", "ModelIdentity", "model_identity", "VectorRegistry", "RegistryError",
           "load_into_engine", "steering_term", "steering_terms", "export_gguf", "import_gguf"]
