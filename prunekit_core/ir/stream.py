"""What stands between a branch's writer and the residual stream it adds into.

A branch's contribution reaches its stream as ``x[target] = x[source] + scale * post(writer(...))``, where
``writer`` is the branch's ``out_proj`` (the last ``nn.Linear`` of the branch) and ``post`` is what the
architecture applies to the writer's output before the add:

- ``"none"``: nothing (Llama, Mistral, Qwen2, GPT-J): the contribution is linear in the writer's output;
- ``"norm"``: a post-norm (Gemma 2/3 ``post_attention_layernorm``/``post_feedforward_layernorm``, OLMo2's
  post-norms): not linear in the writer's output, so a correction folded into the writer is renormalised
  before it reaches the stream;
- ``"gate"``: a per-token gate computed from the branch input (Qwen2-MoE's ``shared_expert_gate``): linear in
  the writer's output for a given token, but not with one constant map;
- ``"opaque"``: something else, or unknown (the generic adapter saw an operation it cannot classify).

``scale`` is a constant multiplier applied after ``post`` (Granite's ``residual_multiplier``; 1.0 elsewhere).
Only ``post == "none"`` is a place where a linear correction can be folded into the writer (the repair
divides its target by ``scale``). ``modules`` are the dotted paths of the modules that make up ``post``, in
the order they are applied; they belong to the branch (its parameters count with it and go with it).

This module imports nothing else of prunekit.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

PostKind = Literal["none", "norm", "gate", "opaque"]


class StreamWrite(BaseModel):
    """How a branch's writer output reaches the stream: ``scale * post(writer_output)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    post: PostKind = "none"
    modules: tuple[str, ...] = ()
    scale: float = 1.0

    @property
    def linear(self) -> bool:
        """Whether the contribution is a constant linear map of the writer's output (a fold is exact)."""
        return self.post == "none"
