"""What the trainer trains, and how the engine comes to serve it without a reload from disk.

The engine reads the Hugging Face model's parameters in place (docs/engine.md, "Weights and
trainers"): q/k/v and gate/up are fused tensors whose HF parameters are views, and on a CPU the
engine keeps packed snapshots that refresh_weights() re-reads.

FullWeights: full fine-tuning trains those very parameters; after an optimizer step the engine
only needs refresh_weights().

LoraWeights: PEFT adapters (lora_A, lora_B) on the chosen linears. The engine cannot run an
adapter's separate path, so before a rollout the update is merged into the shared base weights
and after it the base weights are restored. The scheme is exact, not merge-then-subtract:
  merge():   W <- cast(W0 + s * B @ A)       (computed in fp32 from a kept copy W0)
  unmerge(): W <- W0                         (a copy back, bit for bit)
Subtracting the delta again would leave W0 + d - d, which in floating point drifts from W0 a
little at every step (and in bf16 by whole ulps); restoring from W0 keeps the base weights the
adapters are trained against exactly the loaded ones for the whole run. The cost is one copy of
the adapted weights (all linears of a 4B model in bf16: ~7 GB on the GPU; SmolLM2-135M in fp32:
~0.4 GB). Both writes go into the existing tensors (copy_), so the fused views and the engine's
references stay valid; PEFT's own merged flag is never set, because the adapters' forward (the
training forward) only ever runs on unmerged weights.
"""

from __future__ import annotations

import contextlib

import torch


class FullWeights:
    """Full fine-tuning: every parameter of the model is trained in place."""

    kind = "full"

    def __init__(self, model):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._reference = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._named)

    def merge(self) -> None:
        """Nothing to merge: the engine reads the trained parameters themselves."""

    def unmerge(self) -> None:
        pass

    @torch.no_grad()
    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained policy as a plain model's tensors (the model's own parameter names)."""
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    @contextlib.contextmanager
    def policy_model(self):
        """The model computing the current policy as one plain forward (here: the model itself)."""
        yield self.model

    def keep_reference(self) -> None:
        """Keep a frozen copy of the initial model (the KL reference); call before training."""
        import copy

        if self._reference is None:
            self._reference = copy.deepcopy(self.model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference_model(self):
        """The initial policy's model (a frozen copy made by keep_reference)."""
        if self._reference is None:
            raise RuntimeError("keep_reference() was not called")
        yield self._reference


class LoraWeights:
    """PEFT LoRA adapters injected into the model in place, merged exactly for rollouts."""

    kind = "lora"

    def __init__(self, model, *, rank: int, alpha: float, dropout: float, target_modules: str,
                 layers: list[int] | None, seed: int):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        targets = target_modules.strip()
        if targets == "all-linear":
            # PEFT takes "all-linear" only without a layer selection, so name the linears here: every
            # nn.Linear of the model but the output head.
            target = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")})
        else:
            target = [t.strip() for t in targets.split(",") if t.strip()]
        n_layers = model.config.num_hidden_layers
        if layers is not None and max(layers) >= n_layers:
            raise ValueError(f"TrainConfig.lora_layers: layer {max(layers)} does not exist "
                             f"(the model has {n_layers} layers, 0..{n_layers - 1})")
        try:
            config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                                layers_to_transform=layers, layers_pattern="layers" if layers is not None else None,
                                bias="none")
        except ValueError as error:
            raise ValueError(f"TrainConfig.lora_target_modules / lora_layers: {error}") from None
        # PEFT initialises lora_A from torch's global generator: seed it so every run (and every
        # rank of a distributed one) starts from the same adapters, without touching the
        # caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                inject_adapter_in_model(config, model)
            except ValueError as error:
                raise ValueError(f"TrainConfig.lora_target_modules: {error}") from None
        self.model = model
        self.adapter = "default"
        self.layers: list[tuple[str, LoraLayer]] = [(name, m) for name, m in model.named_modules()
                                                    if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ValueError(f"TrainConfig.lora_target_modules: {target_modules!r} matched no linear of the model")
        for name, m in self.layers:
            if name.endswith("lm_head"):
                raise ValueError("TrainConfig.lora_target_modules: adapters on the output head are not supported "
                                 "(the engine's head is shared with the embedding)")
        self._base = {name: m.base_layer.weight.detach().clone() for name, m in self.layers}
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for n, p in self._named:
            if "lora_" not in n:
                raise RuntimeError(f"parameter {n} is trainable besides the adapters")
        self.merged = False

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._named)

    @torch.no_grad()
    def delta(self, name: str, module) -> torch.Tensor:
        """s * B @ A of one adapted linear, in fp32."""
        a = module.lora_A[self.adapter].weight.float()
        b = module.lora_B[self.adapter].weight.float()
        return (b @ a) * float(module.scaling[self.adapter])

    @torch.no_grad()
    def merge(self) -> None:
        """Write W0 + s * B @ A into every adapted base weight (in place; see the module docstring)."""
        for name, m in self.layers:
            w = m.base_layer.weight
            w.copy_((self._base[name].float() + self.delta(name, m)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every adapted base weight to W0 exactly."""
        for name, m in self.layers:
            m.base_layer.weight.copy_(self._base[name])
        self.merged = False

    @torch.no_grad()
    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained policy as a plain model's tensors: the adapters merged (W0 + s * B @ A, cast
        to the model's dtype, exactly what the engine serves) under the un-adapted model's names,
        so a model loaded from them needs no PEFT."""
        adapted = {name: m for name, m in self.layers}
        out = {}
        for name, tensor in self.model.state_dict().items():
            if "lora_" in name:
                continue
            if ".base_layer." in name:
                owner, leaf = name.split(".base_layer.")
                if leaf == "weight":
                    tensor = (self._base[owner].float() + self.delta(owner, adapted[owner])).to(tensor.dtype)
                name = f"{owner}.{leaf}"
            out[name] = tensor.detach().clone()
        return out

    @contextlib.contextmanager
    def policy_model(self):
        """The model computing the current policy as one plain forward, as the engine serves it:
        the adapters merged into the base weights and their separate path switched off."""
        self.merge()
        try:
            with self._adapters_off():
                yield self.model
        finally:
            self.unmerge()

    @contextlib.contextmanager
    def _adapters_off(self):
        for _, m in self.layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for _, m in self.layers:
                m.enable_adapters(True)

    def keep_reference(self) -> None:
        """The reference (initial) policy is the base model with the adapters switched off."""

    @contextlib.contextmanager
    def reference_model(self):
        """The model with every adapter disabled: the initial policy (the base weights are W0
        whenever the adapters' forward runs)."""
        if self.merged:
            raise RuntimeError("the reference forward needs unmerged weights")
        with self._adapters_off():
            yield self.model


def export_policy(weights, model_config, tokenizer, path) -> "Path":
    """Write the policy `weights` compute as a plain Hugging Face directory (config, tokenizer,
    model.safetensors with any adapters merged), replaced atomically (checkpoint.replace_directory):
    load_model(path) then serves or analyses exactly the weights the engine played the last
    rollouts with."""
    from safetensors.torch import save_file

    from welfare_server.train.checkpoint import replace_directory

    tensors = weights.policy_state_dict()
    if getattr(model_config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied: loading re-ties it to the embedding

    def fill(tmp) -> None:
        model_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})

    return replace_directory(path, fill)
