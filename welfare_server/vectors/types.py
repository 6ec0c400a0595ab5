"""What the concept-vector pipeline produces and passes around: the identity of the model a vector
belongs to, one extraction's class means and concept vectors, and the layer-selection figures.

Every stage (extraction, selection, registry, analyses, report, the server) speaks these types.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

FINGERPRINT_STRIDE = 997
"""Every 997th element of every parameter enters the weights fingerprint (model_identity): cheap
(under a second for a 4B model) and changed by any training step worth the name."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a vector was made from. Vectors are refused by a model whose hidden size or
    layer count differ, and (unless explicitly allowed) by one whose weights differ."""

    name: str
    """The name or path the model was loaded as (informative only)."""
    family: str
    """config.model_type, e.g. "llama"."""
    hidden_size: int
    num_layers: int
    weights_sha256: str
    """sha256 over every parameter's name, shape and a strided sample of its values rounded to
    bf16, so the same checkpoint loaded in fp32 or bf16 has the same fingerprint."""

    def to_json(self) -> dict:
        return dict(name=self.name, family=self.family, hidden_size=self.hidden_size,
                    num_layers=self.num_layers, weights_sha256=self.weights_sha256)

    @classmethod
    def from_json(cls, data: dict) -> "ModelIdentity":
        return cls(**{k: data[k] for k in ("name", "family", "hidden_size", "num_layers", "weights_sha256")})


def model_identity(loaded) -> ModelIdentity:
    """The identity of a LoadedModel (see ModelIdentity.weights_sha256)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(loaded.model.named_parameters(), key=lambda kv: kv[0]):
            sample = param.detach().reshape(-1)[::FINGERPRINT_STRIDE].to("cpu", torch.bfloat16)
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
    config = loaded.model.config
    return ModelIdentity(name=str(loaded.name), family=getattr(config, "model_type", "?"),
                         hidden_size=int(config.hidden_size), num_layers=int(config.num_hidden_layers),
                         weights_sha256=digest.hexdigest())


@dataclass
class LayerSelection:
    """Per-layer separability of held-out projections onto a class's vector (the paper's l*)."""

    auroc: list[float]
    """Per layer: AUROC of the projection separating the class from the others."""
    cohens_d: list[float]
    """Per layer: Cohen's d of the projections (class vs others, pooled standard deviation)."""
    overlap: list[float]
    """Per layer: overlap of the two projection histograms (sum of bin-wise minima of the two
    normalised histograms; 0 = disjoint, 1 = identical)."""
    best_layer: int
    """l* = floor(mean(argmax AUROC, argmax |d|, argmin overlap))."""

    def to_json(self) -> dict:
        return dict(auroc=self.auroc, cohens_d=self.cohens_d, overlap=self.overlap, best_layer=self.best_layer)


@dataclass
class ConceptVectors:
    """One extraction: per-layer class means at one point and the difference-of-means vectors."""

    model: ModelIdentity
    classes: tuple[str, ...]
    """Class names, e.g. ("mold", "gold", "path")."""
    means: torch.Tensor
    """fp32 [L, C, D]: mean residual of each class at each layer (entering block l: what a forward
    pre-hook on block l sees, at the trajectory's last token)."""
    counts: list[int]
    """Examples per class that went into the means."""
    method: str
    """"maze_classes" (the paper's synthetic trajectories), "contrast" (two sets of chats) or
    "rollouts" (live episodes labelled by reward)."""
    point: str = "block_input"
    permuted_means: torch.Tensor | None = None
    """fp32 [K, L, C, D]: the class means again under K random permutations of the class labels
    (class sizes kept), accumulated over the same examples in the same pass: the null distribution
    every cosine is read against (the construction alone makes v_Mold and v_Gold anticorrelated)."""
    selection: dict[str, LayerSelection] = field(default_factory=dict)
    """Per class: the held-out layer-selection figures."""
    source: dict = field(default_factory=dict)
    """How the examples were made (seed, sizes, maze config, ...): enough to make them again."""

    def vector(self, cls: str) -> torch.Tensor:
        """v_c [L, D] = mean_c - mean of the other classes' means (not normalised)."""
        return difference_of_means(self.means, self.classes.index(cls))

    def permuted_vectors(self, cls: str) -> torch.Tensor | None:
        """[K, L, D]: v_c under each label permutation (None without permuted_means)."""
        if self.permuted_means is None:
            return None
        return difference_of_means(self.permuted_means, self.classes.index(cls))


    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: the means (and permuted means) as tensors, everything else as JSON
        in its header; written to a temporary name and renamed, so a reader never sees half a file."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"means": self.means.contiguous()}
        if self.permuted_means is not None:
            tensors["permuted_means"] = self.permuted_means.contiguous()
        header = dict(model=self.model.to_json(), classes=list(self.classes), counts=list(self.counts),
                      method=self.method, point=self.point, source=self.source,
                      selection={k: v.to_json() for k, v in self.selection.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"concept_vectors": json.dumps(header)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptVectors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "concept_vectors" not in meta:
                raise ValueError(f"{path}: not a saved extraction (no concept_vectors header)")
            header = json.loads(meta["concept_vectors"])
            means = f.get_tensor("means")
            permuted = f.get_tensor("permuted_means") if "permuted_means" in f.keys() else None
        return cls(model=ModelIdentity.from_json(header["model"]), classes=tuple(header["classes"]), means=means,
                   counts=list(header["counts"]), method=header["method"], point=header["point"],
                   permuted_means=permuted, source=header["source"],
                   selection={k: LayerSelection(**v) for k, v in header["selection"].items()})


def difference_of_means(means: torch.Tensor, i: int) -> torch.Tensor:
    """means [..., C, D] -> [..., D]: class i's mean minus the mean of the other classes' means."""
    others = [j for j in range(means.shape[-2]) if j != i]
    return means[..., i, :] - means[..., others, :].mean(dim=-2)
