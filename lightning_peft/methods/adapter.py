"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", insert a small
bottleneck (down-projection, nonlinearity, up-projection, residual) twice in every
transformer block: after the attention output projection and after the feed-forward output
projection. Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning", keep only the one after the feed-forward network.

Each adapter wraps the projection it follows::

    h = proj(x)                    # (B, T, d)
    out = h + up(act(down(h)))     # down: d -> bottleneck, up: bottleneck -> d

The up-projection starts at zero, so an adapted model computes exactly what the base model
computed until training moves it. In BERT-style blocks the projection is the ``dense`` layer
*before* dropout and the post-residual LayerNorm, which is where Houlsby placed it.

Where the projections are is read from structure, not from a table of names: inside each
block (:func:`~lightning_peft.targeting.find_block_list`), the attention output projection
is the last linear layer of the block's first attention submodule, and the feed-forward
output projection is the last linear layer of the block outside every attention submodule
(Llama ``self_attn.o_proj`` / ``mlp.down_proj``, GPT-2 ``attn.c_proj`` / ``mlp.c_proj``,
BERT ``attention.output.dense`` / ``output.dense``).

Adapters are nonlinear, so they cannot be merged into the base weights, and Hugging Face
PEFT has no bottleneck adapter: the contract's defaults say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.layers import is_norm, layer_features
from ..core.ownership import AdapterPart, LayerWrapper, declare_trainable, undeclare
from ..core.targeting import find_block_list, linear_layers, replace_module
from .base import Method, MethodError, register

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
_ATTENTION_WORDS = ("attention", "attn")


class Bottleneck(AdapterPart):
    """Down-projection, nonlinearity, up-projection (no residual; :class:`AdapterLayer` adds it).

    Args:
        adapter_name: The adapter it belongs to.
        dim: Width of the hidden states it reads and writes.
        bottleneck: Width of the down-projection.
        activation: One of :data:`ACTIVATIONS`.
        init_std: Standard deviation of the (truncated normal) down-projection init.
        device: Device of the new weights (``"meta"`` keeps a meta model on meta).
        dtype: dtype of the new weights.
    """

    def __init__(
        self,
        adapter_name: str,
        dim: int,
        bottleneck: int,
        activation: str = "relu",
        init_std: float = 1e-2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(adapter_name)
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        if self.down.weight.device.type != "meta":
            with torch.no_grad():
                nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                nn.init.zeros_(self.down.bias)
                nn.init.zeros_(self.up.weight)  # the adapted model starts equal to the base model
                nn.init.zeros_(self.up.bias)
        declare_trainable(self, adapter=adapter_name)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Return the adapter's update ``up(act(down(h)))``; ``h``: (..., dim)."""
        return self.up(self.act(self.down(h)))  # (..., dim)


class AdapterLayer(LayerWrapper):
    """A projection layer followed by residual bottleneck adapters, one per adapter name.

    The wrapped layer stays frozen as ``base_layer``; attributes the rest of the model may
    read (``weight``, ``out_features``, ``nf``, ...) are forwarded to it. Active adapters
    run one after the other, each on the previous one's output (AdapterHub's "Stack").

    Args:
        base_layer: The projection to follow (``nn.Linear`` or GPT-2's ``Conv1D``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``h = base_layer(x)``; then ``h = h + adapter(h)`` for each active adapter; (B, T, d)."""
        h = self.base_layer(*args, **kwargs)  # (B, T, d)
        for adapter in self.adapters.values():
            if not adapter.serves():
                continue
            dtype = adapter.up.weight.dtype
            update = adapter(h.to(dtype))  # (B, T, d)
            if adapter.rows is not None:
                shape = (adapter.rows.shape[0],) + (1,) * (update.ndim - 1)
                update = update * adapter.rows.to(device=update.device, dtype=update.dtype).view(shape)
            h = h + update.to(h.dtype)
        return h


def _new_weight_kwargs(layer: nn.Module) -> dict[str, Any]:
    """Device and dtype for an adapter that follows ``layer``: float32, or the layer's dtype when wider.

    Trainable weights stay in at least float32 for the optimizer; :class:`AdapterLayer`
    feeds the adapter a copy of the hidden states in its dtype and casts the update back.
    """
    weight = next(layer.parameters())
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "dtype", None) is not None:
        dtype = quant_state.dtype
    return {"device": weight.device, "dtype": torch.promote_types(dtype, torch.float32)}


def _is_attention(name: str, module: nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    cls = type(module).__name__.lower()
    named = any(w in last for w in _ATTENTION_WORDS) or "attention" in cls
    # "post_attention_layernorm" is named like attention but holds no projection
    return named and bool(linear_layers(module))


def find_projections(block: nn.Module) -> tuple[str, str]:
    """Return ``(attention_output, feedforward_output)``: names of two linear layers in ``block``.

    The attention output projection is the last linear layer of the block's first
    attention submodule (a module holding linear layers whose attribute name contains
    ``attn``/``attention`` or whose class name contains ``Attention``; nested attention
    modules belong to the top-most one). The feed-forward output projection is the last linear layer of the
    block outside every attention submodule.

    Raises:
        ValueError: If the block has no attention submodule holding a linear layer, no
            linear layer lies outside attention, or the feed-forward is a mixture of experts.
    """
    attention: list[str] = []
    for name, module in block.named_modules():
        if not name or any(name.startswith(a + ".") for a in attention):
            continue
        if _is_attention(name, module):
            attention.append(name)
    linears = [(n, m) for n, m in linear_layers(block) if n]
    names = [n for n, _ in linears]
    if not attention:
        raise ValueError(
            f"found no attention submodule in transformer block {type(block).__name__} (looked for a child "
            f"named *attn*/*attention* or of an *Attention class, holding linear layers); its linear "
            f"layers are {names}. "
            "Adapter supports standard attention + feed-forward blocks (BERT, Llama, GPT-2 and alike)."
        )
    first = attention[0]
    in_attention = [n for n in names if n.startswith(first + ".")]
    outside = [n for n in names if not any(n.startswith(a + ".") for a in attention)]
    if not outside:
        raise ValueError(
            f"found no feed-forward linear layer outside attention in {type(block).__name__}; "
            f"linear layers: {names}"
        )
    ffn_owner = outside[-1].rsplit(".", 1)[0] if "." in outside[-1] else ""
    if ffn_owner and isinstance(block.get_submodule(ffn_owner), nn.ModuleList):
        raise ValueError(
            f"the feed-forward output of {type(block).__name__} ({outside[-1]}) sits in a list of experts; "
            "mixture-of-experts blocks are not supported by Adapter"
        )
    return in_attention[-1], outside[-1]


@register
@dataclass
class AdapterConfig(Method):
    """Residual bottleneck adapters inside every transformer block."""

    bottleneck: int = 64
    """Width of the down-projection (the adapter's hidden size)."""
    placement: str = "houlsby"
    """``"houlsby"``: two adapters per block (after the attention output projection and
    after the feed-forward output projection); ``"pfeiffer"``: one, after the feed-forward."""
    activation: str = "relu"
    """Nonlinearity between the projections: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``."""
    train_layernorm: bool = False
    """Also train the normalization layers inside the blocks (as Houlsby et al. did)."""
    init_std: float = 1e-2
    """Standard deviation of the down-projection's truncated-normal init (the
    up-projection always starts at zero)."""

    name = "adapter"
    callback_name = "Adapter"
    example = {"bottleneck": 8}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"Adapter bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown Adapter placement {self.placement!r}; choose from {list(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown Adapter activation {self.activation!r}; choose from {list(ACTIVATIONS)}"
            )
        if not isinstance(self.train_layernorm, bool):
            raise ValueError(f"train_layernorm must be True or False, got {self.train_layernorm!r}")
        if (
            not isinstance(self.init_std, (int, float))
            or isinstance(self.init_std, bool)
            or self.init_std <= 0
        ):
            raise ValueError(f"Adapter init_std must be a positive number, got {self.init_std!r}")

    def targets(self, model: nn.Module) -> list[str]:
        """Qualified names of the projections this configuration adapts in ``model``, in order.

        Raises:
            ValueError: If the blocks, or the projections inside them, cannot be found.
        """
        list_name, blocks = find_block_list(model)
        names: list[str] = []
        for i, block in enumerate(blocks):
            attn_out, ffn_out = find_projections(block)
            prefix = f"{list_name}.{i}." if list_name else f"{i}."
            if self.placement == "houlsby":
                names.append(prefix + attn_out)
            names.append(prefix + ffn_out)
        return names

    def inject(self, model: nn.Module) -> None:
        """Put a bottleneck after every targeted projection (joining an :class:`AdapterLayer` already there)."""
        for name in self.targets(model):
            layer = model.get_submodule(name)  # another method's wrapper is followed like its layer
            wrapper = layer if isinstance(layer, AdapterLayer) else AdapterLayer(layer)
            base = wrapper.innermost()
            adapter = Bottleneck(
                self.adapter_name,
                layer_features(base)[1],
                self.bottleneck,
                self.activation,
                init_std=float(self.init_std),
                **_new_weight_kwargs(base),
            )
            adapter.train(base.training)
            wrapper.adapters[self.adapter_name] = adapter
            if wrapper is not layer:
                replace_module(model, name, wrapper)
        if self.train_layernorm:
            _, blocks = find_block_list(model)
            norms = [m for block in blocks for m in block.modules() if is_norm(m)]
            if not norms:
                raise ValueError(
                    f"train_layernorm=True but the blocks of {type(model).__name__} have no normalization layers"
                )
            for norm in norms:
                declare_trainable(norm, adapter=self.adapter_name)

    def merge(self, model: nn.Module) -> None:
        """Bottleneck adapters are nonlinear: they cannot be folded into the base weights.

        Raises:
            MethodError: Always, naming what works instead.
        """
        raise MethodError(
            f"Adapter (adapter {self.adapter_name!r}) cannot be merged into the base weights: a bottleneck "
            "adapter is nonlinear. Save it with save_delta or a delta checkpoint; there is no PEFT or merged form"
        )

    def remove(self, model: nn.Module) -> None:
        """Take this adapter's bottlenecks out; a layer left without any gets its plain projection back.

        Raises:
            MethodError: If the adapter trained normalization layers (changed in place).
        """
        if self.train_layernorm:
            raise MethodError(
                f"adapter {self.adapter_name!r} trained the normalization layers in place "
                "(train_layernorm=True); deleting it cannot give the base model back"
            )
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer) and self.adapter_name in module.adapters:
                del module.adapters[self.adapter_name]
                if not len(module.adapters):
                    replace_module(model, name, module.base_layer)
        for module in model.modules():
            undeclare(module, self.adapter_name)

    def check_routable(self, model: nn.Module, adapters: list[Method]) -> None:
        """Rows of one batch may use different bottleneck adapters (each runs on its own rows)."""
