"""The methods, looked up by name: what each adds to the ViT, what trains, how it optimises.

Every method is one `Method` entry. Its `parts` switch on the model's extra components, whose
sizes come from `config.model` (num_queries, num_prompts, adapter_dim, lora_rank, ...), so one
config serves every method and a method that does not use a part gets it switched off. Its
`trainable` rule is a list of regular expressions over `collection/param/path` names; every
other leaf is frozen, gets no optimiser state, and is never differentiated.

`cache` says what stays constant per image while the method trains (without augmentation),
so that training can run from a cache instead of the backbone (see `vqt_jax/cache.py`):
'kv' (every layer's keys/values and the final CLS: VQT's query path reads nothing else) or
'features' (the head's input itself: linear probing, Head2Toe); None when the trainable part
changes the ordinary tokens (VPT, adapters, LoRA, full fine-tuning).
"""

from __future__ import annotations

import dataclasses
from typing import Any

HEAD = r"params/head/.*"

# A part of the model -> the config.model fields that size it (0 switches it off).
PARTS: dict[str, tuple[str, ...]] = {
    "queries": ("num_queries",),
    "prompts": ("num_prompts",),
    "adapter": ("adapter_dim",),
    "lora": ("lora_rank",),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of using a frozen backbone.

    Attributes:
      parts: the model parts it uses (keys of PARTS); the others are switched off.
      trainable: regexes over 'collection/path' naming the leaves that train.
      model: further model settings it implies (e.g. deep_prompts, head2toe).
      cache: what a cache of the frozen computation keeps: 'kv', 'features' or None.
      optimizer: its release's optimiser: 'adam' (coupled L2), 'sgd' (momentum 0.9,
        coupled L2) or 'adamw' (decoupled decay).
      description: one line for README and error messages.
    """

    parts: tuple[str, ...]
    trainable: tuple[str, ...]
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache: str | None = None
    optimizer: str = "adam"
    description: str = ""


METHODS: dict[str, Method] = {
    "vqt": Method(("queries",), (r"queries/.*", HEAD), cache="kv",
                  description="Visual Query Tuning: per-layer query tokens + linear head"),
    "linear": Method((), (HEAD,), cache="features", optimizer="sgd",
                     description="linear probing: a linear head on the final CLS"),
    "full": Method((), (r"params/.*",), optimizer="adamw",
                   description="full fine-tuning of the backbone and head"),
    "vpt_shallow": Method(("prompts",), (r"prompts/.*", HEAD), {"deep_prompts": False},
                          optimizer="sgd", description="VPT-shallow: prompts at the input"),
    "vpt_deep": Method(("prompts",), (r"prompts/.*", HEAD), {"deep_prompts": True},
                       optimizer="sgd", description="VPT-deep: new prompts at every layer"),
    "adaptformer": Method(("adapter",), (r"adapter/.*", HEAD),
                          description="AdaptFormer: a parallel bottleneck adapter per MLP"),
    "lora": Method(("lora",), (r"lora/.*", HEAD),
                   description="LoRA: low-rank updates of W_q and W_v"),
    "head2toe": Method((), (HEAD,), {"head2toe": True}, cache="features",
                       description="Head2Toe: a linear head on every block's pooled tokens"),
    "vqt+vpt_deep": Method(("queries", "prompts"), (r"queries/.*", r"prompts/.*", HEAD),
                           {"deep_prompts": True},
                           description="VQT reading VPT-deep's prompted keys/values"),
    "vqt+adaptformer": Method(("queries", "adapter"), (r"queries/.*", r"adapter/.*", HEAD),
                              description="VQT on an AdaptFormer-adapted backbone"),
    "vqt+lora": Method(("queries", "lora"), (r"queries/.*", r"lora/.*", HEAD),
                       description="VQT on a LoRA-adapted backbone"),
}


def get(name: str) -> Method:
    """The method of a name; ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def model_kwargs(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """config.model's fields adjusted for a method: unused parts off, its settings applied.

    Raises:
      ValueError: if a part the method needs has size 0 in `model`.
    """
    method = get(name)
    out = dict(model)
    for part, fields in PARTS.items():
        if part in method.parts:
            for f in fields:
                if not out.get(f):
                    raise ValueError(f"method {name!r} needs config.model.{f} > 0, "
                                     f"got {out.get(f)}")
        else:
            out.update({f: 0 for f in fields})
    out.update(method.model)
    return out
