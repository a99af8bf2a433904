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

The rest of an entry is its release's VTAB-1k training recipe: optimiser (see
`vqt_jax/training/optim.py`), warm-up epochs, batch size and (lr, wd) grid. Both releases train
100 epochs (TOTAL_EPOCH in every config below) and scale the grid's lr to the batch size:
lr / 256 * DATA.BATCH_SIZE (KMnP/vpt tune_vtab.py `setup`, andytu28/VQT head2toe_train.py).
Sources, quoted per entry: KMnP/vpt (VPT: full fine-tuning, linear probing, VPT-shallow/deep)
and andytu28/VQT (VQT; its solver is VPT's, unchanged). A method whose release has no VTAB-1k
protocol (AdaptFormer, LoRA, Head2Toe here) and VQT's combinations use VQT's recipe.

AdaptFormer (ShoufaChen/AdaptFormer) releases only a full-dataset image recipe, which we do not
adopt for VTAB-1k: main_image.py trains with torch SGD (momentum 0.9, weight_decay 0 by default,
every trainable leaf decayed alike), lr = blr 0.1 x batch / 256 (README: 128 per GPU x 8 GPUs),
20 warm-up epochs of 100 with the lr set every iteration (util/lr_sched.py), and a
BatchNorm1d(affine=False) before a trunc_normal(0.01) head. Its adapter, which the model's
Adapter (`vqt_jax/models/vit.py`) transcribes: parallel to the MLP on the post-attention
residual stream, no LayerNorm, scale 0.1, LoRA-style init (down kaiming_uniform(a=sqrt 5), up
and biases 0), dropout 0.1 after the ReLU (models/adapter.py, models/custom_modules.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

HEAD = r"params/head/.*"

# A part of the model -> the config.model fields that size it (0 switches it off).
PARTS: dict[str, tuple[str, ...]] = {
    "queries": ("num_queries",),
    "prompts": ("num_prompts",),
    "adapter": ("adapter_dim",),
    "lora": ("lora_rank",),
}

# The releases' grids. Learning rates are per 256 images (scaled to the batch size as above)
# and kept in the release's order.
# Weight decays: every train type of KMnP/vpt tune_vtab.py `get_lrwd_range`, and
# andytu28/VQT head2toe_train.py `get_lrwd_range` ('h2t-prompt', adam, ViT-B).
WDS: tuple[float, ...] = (0.01, 0.001, 0.0001, 0.0)
# andytu28/VQT head2toe_train.py `get_lrwd_range`, 'h2t-prompt' with adam, ViT-B.
VQT_LRS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05)
# KMnP/vpt tune_vtab.py `get_lrwd_range`, train_type 'linear'.
VPT_LINEAR_LRS: tuple[float, ...] = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
# KMnP/vpt tune_vtab.py `get_lrwd_range`, train_type 'prompt' (the same set, another order).
VPT_PROMPT_LRS: tuple[float, ...] = (5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05)
# KMnP/vpt tune_vtab.py `get_lrwd_range`, train_type 'finetune'.
VPT_FINETUNE_LRS: tuple[float, ...] = (0.001, 0.0001, 0.0005, 0.005)

_VQT_SOURCE = ("andytu28/VQT: src/solver/optimizer.py (OPTIMIZER adam), configs/h2t-prompt/"
               "vtab.yaml (WARMUP_EPOCH 10), scripts/VQT/run_vqt_vtab.sh (BATCH_SIZE 128), "
               "head2toe_train.py get_lrwd_range ('h2t-prompt', adam)")
_VPT_LINEAR_SOURCE = ("KMnP/vpt: src/solver/optimizer.py (sgd), configs/base-linear.yaml "
                      "(MOMENTUM 0.9, WARMUP_EPOCH 10, BATCH_SIZE 1024), tune_vtab.py 'linear'")
_VPT_PROMPT_SOURCE = ("KMnP/vpt: src/solver/optimizer.py (sgd), configs/base-prompt.yaml "
                      "(MOMENTUM 0.9, WARMUP_EPOCH 10, BATCH_SIZE 128), tune_vtab.py 'prompt'")
_VPT_FINETUNE_SOURCE = ("KMnP/vpt: src/solver/optimizer.py (its AdamW), configs/"
                        "base-finetune.yaml (WARMUP_EPOCH 5, BATCH_SIZE 384), tune_vtab.py "
                        "'finetune'")
_NO_RELEASE = "no VTAB-1k recipe in its release: VQT's (" + _VQT_SOURCE + ")"


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of using a frozen backbone, with its release's training recipe.

    Attributes:
      parts: the model parts it uses (keys of PARTS); the others are switched off.
      trainable: regexes over 'collection/path' naming the leaves that train.
      model: further model settings it implies (e.g. deep_prompts, head2toe).
      cache: what a cache of the frozen computation keeps: 'kv', 'features' or None.
      optimizer: its release's optimiser (a name of `optim.OPTIMIZERS`): 'adam' (VQT's torch
        Adam, coupled L2), 'sgd' (VPT's torch SGD, momentum 0.9, coupled L2) or 'adamw' (VPT's
        own AdamW, decoupled decay); which leaves each decays is `optim.decay_mask`'s.
      warmup_epochs: epochs of linear lr warm-up (SOLVER.WARMUP_EPOCH).
      batch_size: training batch size (DATA.BATCH_SIZE) at which `lr_grid` is scaled.
      lr_grid: base learning rates per 256 images; the lr used is lr * batch_size / 256.
      wd_grid: weight decays searched together with `lr_grid`.
      source: the release files these settings come from.
    """

    parts: tuple[str, ...]
    trainable: tuple[str, ...]
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache: str | None = None
    optimizer: str = "adam"
    warmup_epochs: int = 10
    batch_size: int = 128
    lr_grid: tuple[float, ...] = VQT_LRS
    wd_grid: tuple[float, ...] = WDS
    source: str = _VQT_SOURCE


METHODS: dict[str, Method] = {
    # Visual Query Tuning: per-layer query tokens + linear head.
    "vqt": Method(("queries",), (r"queries/.*", HEAD), cache="kv"),
    # Linear probing: a linear head on the final CLS.
    "linear": Method((), (HEAD,), cache="features", optimizer="sgd", batch_size=1024,
                     lr_grid=VPT_LINEAR_LRS, source=_VPT_LINEAR_SOURCE),
    # Full fine-tuning of the backbone and head.
    "full": Method((), (r"params/.*",), optimizer="adamw", warmup_epochs=5, batch_size=384,
                   lr_grid=VPT_FINETUNE_LRS, source=_VPT_FINETUNE_SOURCE),
    # VPT-shallow: prompts at the input. VPT's demo.ipynb: "we don't use dropout for
    # VPT-shallow" (MODEL.PROMPT.DROPOUT 0.0); its VPT-deep VTAB runs use 0.1, the model's
    # default prompt_dropout.
    "vpt_shallow": Method(("prompts",), (r"prompts/.*", HEAD),
                          {"deep_prompts": False, "prompt_dropout": 0.0}, optimizer="sgd",
                          lr_grid=VPT_PROMPT_LRS, source=_VPT_PROMPT_SOURCE),
    # VPT-deep: new prompts at every layer.
    "vpt_deep": Method(("prompts",), (r"prompts/.*", HEAD), {"deep_prompts": True},
                       optimizer="sgd", lr_grid=VPT_PROMPT_LRS, source=_VPT_PROMPT_SOURCE),
    # AdaptFormer: a parallel bottleneck adapter per MLP.
    "adaptformer": Method(("adapter",), (r"adapter/.*", HEAD), source=_NO_RELEASE),
    # LoRA: low-rank updates of W_q and W_v.
    "lora": Method(("lora",), (r"lora/.*", HEAD), source=_NO_RELEASE),
    # Head2Toe: a linear head on every block's pooled tokens.
    "head2toe": Method((), (HEAD,), {"head2toe": True}, cache="features", source=_NO_RELEASE),
    # VQT reading VPT-deep's prompted keys/values.
    "vqt+vpt_deep": Method(("queries", "prompts"), (r"queries/.*", r"prompts/.*", HEAD),
                           {"deep_prompts": True}),
    # VQT on an AdaptFormer-adapted backbone.
    "vqt+adaptformer": Method(("queries", "adapter"), (r"queries/.*", r"adapter/.*", HEAD)),
    # VQT on a LoRA-adapted backbone.
    "vqt+lora": Method(("queries", "lora"), (r"queries/.*", r"lora/.*", HEAD)),
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
        for f in fields:
            if part not in method.parts:
                out[f] = 0
            elif not out.get(f):
                raise ValueError(f"method {name!r} needs config.model.{f} > 0, got {out.get(f)}")
    return {**out, **method.model}


# Config fields that, left unset (None), take the method's release value (`vqt_jax.resolve`
# fills them: configs/vtab.py leaves them unset, so `--config.method=full` trains with VPT's
# AdamW, batch 384 and 5 warm-up epochs; a value set in the config or on the command line wins).
RECIPE_FIELDS = ("optimizer", "batch_size", "warmup_epochs")


def optimizer_name(config: Mapping[str, Any]) -> str:
    """config.optimizer, or by default the optimiser of the method's release."""
    return config.get("optimizer") or get(config["method"]).optimizer
