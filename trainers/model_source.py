"""What a causal LM's own ``forward`` does around its head, read from that forward's source.

The fused forward (`trainers.fused_forward`) runs a model's backbone and the fused head in place of the model's
``forward``, so it must call the backbone that forward calls and add the MoE router loss as that forward adds it.
Both differ between models in ways their configs do not show:

- the backbone: ``model.base_model`` (the child named by ``base_model_prefix``), except where the prefix names no
  child: Llama 4's and Mllama's text models keep ``base_model_prefix = "language_model"`` and call ``self.model``;
- the router loss: most MoE forwards call their module's ``load_balancing_loss_func(outputs.router_logits,
  self.num_experts, self.num_experts_per_tok, attention_mask)`` and add it times ``self.router_aux_loss_coef``, but
  those attributes are set in ``__init__`` from differently named config fields (DBRX: ``ffn_config.moe_loss_weight``),
  image-text models read ``self.config.text_config``, Llama 4's text model returns router logits and adds no loss,
  and Doge passes a top-k computed from the expert count.

So both are read from the source of the first class in the model's MRO that defines ``forward`` (the model's own
method, also after a patch replaced it on the class), and a form not recognised is an error when it matters.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: An attribute path on the model, as a forward writes it: ``self.num_experts``, ``self.config.text_config.x``.
_PATH = r"self(?:\.\w+)+"
_AUX_CALL = re.compile(rf"aux_loss = (\w+)\(\s*outputs\.router_logits,\s*({_PATH}),\s*({_PATH}),\s*attention_mask,?\s*\)")
#: The line adding the router loss: ``loss += self.router_aux_loss_coef * aux_loss`` (any attribute path).
AUX_ADD = re.compile(rf"loss \+= ({_PATH}) \* aux_loss\b")


@functools.lru_cache(maxsize=None)
def method_source(cls: type, name: str) -> tuple[type, str]:
    """``(class, source)`` of method ``name``: the first class of ``cls``'s MRO that defines it, and the method's
    source as that class's file has it, without its docstring. ValueError when the source cannot be read."""
    for klass in cls.__mro__:
        if name not in klass.__dict__:
            continue
        try:
            text = inspect.getsource(klass)
        except (OSError, TypeError) as e:
            raise ValueError(
                f"cannot read the source of {klass.__name__} ({e}), so the fused head cannot check what its `{name}` "
                "does; use a model class defined in a file."
            ) from e
        found = re.search(rf"^([ \t]+)def {name}\(.*?(?=^\1(?:def |@|class )|\Z)", text, re.M | re.S)
        if found is not None:
            body = found.group(0)
            return klass, (body.split('"""')[-1] if body.count('"""') >= 2 else body)
    raise ValueError(f"found no `def {name}` in the source of {cls.__name__} or its bases")


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``model.forward`` runs before its head: ``model.base_model``, or, where ``base_model_prefix``
    names no child (``base_model`` is then the model itself), the child module its forward calls first."""
    base = model.base_model
    if base is not model:
        return base
    attr = _first_call(type(model))
    child = getattr(model, attr, None) if attr else None
    if isinstance(child, torch.nn.Module) and child is not model.get_output_embeddings():
        return child
    raise ValueError(
        f"cannot find the backbone of {type(model).__name__}: its base_model_prefix "
        f"{type(model).base_model_prefix!r} names no child module, and its forward calls no child module before its "
        "head"
    )


@functools.lru_cache(maxsize=None)
def _first_call(cls: type) -> Optional[str]:
    """The attribute whose call ``cls.forward`` assigns first (``outputs = self.model(...)``), read once per class."""
    first = re.search(r"=\s*self\.(\w+)\(", method_source(cls, "forward")[1])
    return first.group(1) if first else None


def _resolve(model, path: str):
    value = model
    for part in path.split(".")[1:]:
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class RouterLoss:
    """How a MoE model's forward computes its router loss and adds it to the LM loss.

    ``function`` is its module's load-balancing function, called as ``function(router_logits, num_experts,
    top_k, attention_mask)``; the three paths are attribute paths on the model (``self.num_experts``); ``coefficient``
    is None when the forward computes the router loss but does not add it to the loss.
    """

    function: Callable
    num_experts: str
    top_k: str
    coefficient: Optional[str]

    def aux_loss(self, model, router_logits, attention_mask) -> torch.Tensor:
        """The router loss, a 0-dim tensor, as the model's forward computes it."""
        return self.function(router_logits, _resolve(model, self.num_experts), _resolve(model, self.top_k),
                             attention_mask)

    def weight(self, model) -> float:
        """The factor of the router loss in the model's loss (0 when the forward does not add it)."""
        return 0.0 if self.coefficient is None else float(_resolve(model, self.coefficient))


@functools.lru_cache(maxsize=None)
def _router_loss(cls: type) -> tuple[Optional[RouterLoss], Optional[str]]:
    klass, body = method_source(cls, "forward")
    call = _AUX_CALL.search(body)
    add = AUX_ADD.search(body)
    if call is None:
        if add is not None or re.search(r"^\s*aux_loss = (?!None\b)", body, re.M):
            return None, (f"{cls.__name__}'s forward computes its MoE router loss in a form the fused head does not "
                          "reproduce")
        return None, None  # no router loss: the forward returns router logits at most
    function = getattr(sys.modules[klass.__module__], call.group(1), None)
    if not callable(function):
        return None, f"{cls.__name__}'s forward calls {call.group(1)}, which its module does not define"
    return RouterLoss(function, call.group(2), call.group(3), add.group(1) if add else None), None


def router_loss(cls: type) -> Optional[RouterLoss]:
    """The router loss of ``cls.forward`` (`RouterLoss`), None when it computes none. ValueError when it computes one
    in another form than ``aux_loss = f(outputs.router_logits, self.x, self.y, attention_mask)`` (added, if at all,
    as ``loss += self.z * aux_loss``)."""
    spec, problem = _router_loss(cls)
    if problem is not None:
        raise ValueError(
            f"{problem}: call it with output_router_logits=False (and set the config's output_router_logits to "
            "False), or add the router loss yourself from `outputs.router_logits`."
        )
    return spec
