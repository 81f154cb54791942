"""``FourBitPrecision``: QLoRA's 4-bit frozen base as a Lightning precision plugin.

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs": the frozen base
weights are stored in 4-bit NormalFloat with double-quantized block scales, the matmuls
run in bf16, and only the small trainable parameters (adapters, LoRA, heads) are kept in
fp32 for the optimizer.

``Trainer(plugins=[FourBitPrecision()])`` is all it takes. Lightning's accelerator
connector uses any ``Precision`` instance passed in ``plugins`` as the run's precision, and
``strategy.setup`` calls :meth:`FourBitPrecision.convert_module` after ``configure_model``
(so after every method callback injected its modules) and before the optimizers are
built: that is where the base is quantized. Unlike Lightning's ``BitsandbytesPrecision``
it runs on CPU as well as CUDA, never quantizes a trainable layer, and keeps output heads
in full precision.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .core.layers import is_4bit
from .methods.base import trainable_named_parameters
from .quantization.convert import quantizable_modules, quantize_model
from .quantization.heap import return_large_blocks_to_os
from .quantization.spec import QuantSpec
from .quantization.streaming import load_quantized, quantize_on_init

UNSUPPORTED_STRATEGIES: tuple[tuple[type, str], ...] = (
    (
        DeepSpeedStrategy,
        "DeepSpeed's ZeRO partitions and re-casts every parameter; 4-bit parameters carry their quantization "
        "state outside the tensor and cannot be partitioned that way",
    ),
    (
        FSDPStrategy,
        "FSDP flattens and shards parameters; bitsandbytes' 4-bit parameters keep their scales outside the "
        "tensor, which FSDP does not shard or gather (support via quant_storage is planned)",
    ),
    (
        ModelParallelStrategy,
        "FSDP2 shards parameters as DTensors, which drops the 4-bit scales a parameter carries; the base must "
        "be quantized before it is sharded (lightning_peft's modules and "
        "lightning_peft.strategies.shard_backbone do that in configure_model)",
    ),
    (XLAStrategy, "bitsandbytes has no XLA kernels"),
    (SingleDeviceXLAStrategy, "bitsandbytes has no XLA kernels"),
)
"""Strategies that cannot hold a 4-bit base, and why (one table, checked with ``isinstance``)."""


class FourBitPrecision(Precision):
    """Quantize the frozen base linear layers to 4 bits; compute in ``compute_dtype``.

    Args:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
        double_quant: Quantize the per-block scales again (8-bit, blocks of 256).
        compute_dtype: dtype of the matmuls: ``torch.bfloat16`` (default),
            ``torch.float16`` or ``torch.float32`` (a name such as ``"bfloat16"`` works too,
            for YAML configs).
        skip_modules: Module names (full, or trailing components such as ``"down_proj"``)
            to keep in full precision, in addition to the output heads.
        blocksize: Weights per quantization block (64 by default, as in QLoRA).
        quantize_heads: Quantize output heads too (off by default: they are small and
            sensitive).
        return_freed_memory: On CPU runs, serve host allocations of 128 KiB or more with
            their own mappings (glibc), so the memory each step frees leaves the resident
            set at once instead of piling up in the heap (see
            :func:`lightning_peft.quantization.return_large_blocks_to_os`; process-wide,
            measured in ``benchmarks/qlora.py``). Nothing changes on CUDA runs or outside glibc.

    Raises:
        ValueError: For an unknown ``quant_type``, a non-float ``compute_dtype``, a
            ``blocksize`` that is not a power of two in 64..4096, or a malformed
            ``skip_modules``.
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | str = torch.bfloat16,
        skip_modules: Iterable[str] | str | None = None,
        *,
        blocksize: int = 64,
        quantize_heads: bool = False,
        return_freed_memory: bool = True,
    ) -> None:
        self.spec = QuantSpec(
            quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype, blocksize=blocksize
        )
        if isinstance(skip_modules, str):
            skip_modules = [skip_modules]
        skip = list(skip_modules or ())
        bad = [s for s in skip if not isinstance(s, str) or not s or s.startswith(".") or s.endswith(".")]
        if bad:
            raise ValueError(f"skip_modules must be module names such as 'lm_head' or 'down_proj'; got {bad}")
        if not isinstance(quantize_heads, bool):
            raise ValueError(f"quantize_heads must be True or False, got {quantize_heads!r}")
        if not isinstance(return_freed_memory, bool):
            raise ValueError(f"return_freed_memory must be True or False, got {return_freed_memory!r}")
        self.skip_modules = skip
        self.quantize_heads = quantize_heads
        self.return_freed_memory = return_freed_memory
        self.quantized_modules: list[str] = []
        self._device_type = "cpu"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in."""
        return self.spec.compute_dtype

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"{type(self).__name__}(quant_type={s.quant_type!r}, double_quant={s.double_quant}, "
            f"compute_dtype={s.compute_dtype}, skip_modules={self.skip_modules}, blocksize={s.blocksize})"
        )

    # -- the model ----------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize the frozen base linear layers of ``module`` in place and return it.

        Trainable parameters (declared, or with ``requires_grad``) are left alone and cast
        to fp32 for the optimizer; the modules of every method, output heads and
        ``skip_modules`` are left alone; a LoRA wrapper's frozen ``base`` is quantized.
        Runs once per layer: already-quantized layers are kept.

        Raises:
            RuntimeError: If the Trainer's strategy cannot hold 4-bit parameters.
        """
        trainer = getattr(module, "_trainer", None) if isinstance(module, L.LightningModule) else None
        device = None
        if trainer is not None:
            pending = quantizable_modules(module, self.skip_modules, skip_heads=not self.quantize_heads)
            check_strategy(trainer.strategy, pending, sharding_next=getattr(self, "_sharding_next", False))
            device = trainer.strategy.root_device
        first = next(module.parameters(), None)
        if device is None and first is not None:
            device = first.device
        if device is not None and device.type == "meta":
            device = None
        self._device_type = device.type if device is not None else "cpu"
        if trainer is not None:  # a run, not a call by hand
            self._tend_host_memory()
        self.quantized_modules += quantize_model(
            module,
            self.spec,
            skip_modules=self.skip_modules,
            skip_heads=not self.quantize_heads,
            device=device,
        )
        upcast_trainable(module)
        if not any(is_4bit(m) for m in module.modules()):
            rank_zero_warn(
                f"FourBitPrecision found no frozen linear layer to quantize in {type(module).__name__}: "
                "everything is trainable, skipped, or not a linear layer. Freeze the base (any method callback "
                "does) or check skip_modules."
            )
        return module

    def quantize_before_sharding(self, module: nn.Module) -> nn.Module:
        """:meth:`convert_module` ahead of FSDP2 sharding under ``ModelParallelStrategy``.

        The 4-bit codes are then sharded like any tensor while their scales stay on each
        layer; :func:`lightning_peft.strategies.shard_backbone` calls this first.
        """
        self._sharding_next = True
        try:
            return self.convert_module(module)
        finally:
            self._sharding_next = False

    def _tend_host_memory(self) -> None:
        """Apply ``return_freed_memory`` for a run on the CPU."""
        if self.return_freed_memory and self._device_type == "cpu":
            return_large_blocks_to_os()

    @contextlib.contextmanager
    def _building(self) -> Any:
        with quantize_on_init(self.spec, self.skip_modules, skip_heads=not self.quantize_heads):
            yield

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        """Quantize linear layers as they are built (``Trainer.init_module()``), one at a time."""
        return self._building()

    def module_init_context(self) -> contextlib.AbstractContextManager:
        """Same as :meth:`tensor_init_context` (used around ``configure_model``)."""
        return self._building()

    def load(self, source: str, auto_class: Any = None, **kwargs: Any) -> nn.Module:
        """Load a local Hugging Face folder straight into 4-bit with these settings.

        See :func:`lightning_peft.quantization.load_quantized` (a folder, an ``embedded:`` name or a hub id); the result can be passed
        to ``CausalLM(model)`` / ``SequenceClassifier(model)``.
        """
        skip = kwargs.pop("skip_modules", self.skip_modules)
        return load_quantized(
            source,
            auto_class,
            spec=self.spec,
            skip_modules=skip,
            skip_heads=not self.quantize_heads,
            **kwargs,
        )

    def load_backbone(
        self,
        source: str | os.PathLike,
        auto_class: Any = None,
        trainer: Any = None,
        *,
        dtype: torch.dtype | str | None = "auto",
        prefix: str = "",
        only: Iterable[str] | None = None,
        **config_kwargs: Any,
    ) -> nn.Module:
        """Stream a checkpoint straight into a 4-bit model for ``trainer``'s run.

        What ``CausalLM(path)`` and ``SequenceClassifier(path)`` call when they load their
        backbone inside a run that uses this plugin: the strategy is checked first (before
        anything is read), then :func:`~lightning_peft.quantization.load_quantized` reads
        the safetensors one tensor at a time, quantizing each frozen linear layer on the
        run's device as it arrives. Every process of a DDP or FSDP2 run does the same (FSDP2
        shards the 4-bit model afterwards). The full-precision model is never held.

        Args:
            source: A folder, hub id or ``embedded:`` name.
            auto_class: The transformers auto class (default ``AutoModelForCausalLM``).
            trainer: The run (for its strategy and device); ``None``: the CPU.
            dtype: dtype of the layers that stay in full precision (embeddings, norms,
                heads) and of the weights before quantization; ``"auto"`` (default) takes the
                config's ``dtype``, else the checkpoint's, as ``from_pretrained`` does.
            prefix: Prepended to the recorded names in :attr:`quantized_modules`.
            only: Quantize only these layers (names in the loaded model), for example
                leaving out those a method will train; default: every layer the rules select.
            **config_kwargs: Config overrides (``num_labels=2``).

        Raises:
            RuntimeError: If the Trainer's strategy cannot hold 4-bit parameters.
        """
        device = torch.device("cpu")
        if trainer is not None:
            check_strategy(trainer.strategy, [])  # 4-bit from the start: FSDP2 shards it afterwards
            device = trainer.strategy.root_device
            self._device_type = device.type
            self._tend_host_memory()
        model = load_quantized(
            source,
            auto_class,
            spec=self.spec,
            dtype=dtype,
            skip_modules=self.skip_modules,
            skip_heads=not self.quantize_heads,
            device=device,
            only=only,
            **config_kwargs,
        )
        self.quantized_modules += [prefix + n for n, m in model.named_modules() if is_4bit(m)]
        return model

    # -- the steps ----------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast the non-quantized layers to ``compute_dtype`` (nothing to do in fp32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=self.compute_dtype)

    def convert_input(self, data: Any) -> Any:
        """Inputs stay as they are (token ids; float inputs are cast by autocast)."""
        return data

    def convert_output(self, data: Any) -> Any:
        """Outputs stay as they are."""
        return data

    def state_dict(self) -> dict[str, Any]:
        """The settings, saved in checkpoints for reference."""
        s = self.spec
        return {
            "quant_type": s.quant_type,
            "double_quant": s.double_quant,
            "compute_dtype": str(s.compute_dtype).replace("torch.", ""),
            "blocksize": s.blocksize,
            "skip_modules": list(self.skip_modules),
            "quantize_heads": self.quantize_heads,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn if a checkpoint was trained with other quantization settings."""
        if state_dict and state_dict != self.state_dict():
            rank_zero_warn(
                f"this checkpoint was trained with FourBitPrecision settings {state_dict}; resuming with "
                f"{self.state_dict()}: the frozen base is quantized differently"
            )


def check_strategy(
    strategy: Any, pending: list[tuple[str, nn.Module]] | None = None, *, sharding_next: bool = False
) -> None:
    """Raise ``RuntimeError`` if ``strategy`` cannot train over 4-bit parameters.

    Single-device and DDP strategies work (quantization is deterministic, so every rank
    holds the same base). ``ModelParallelStrategy`` (FSDP2) works when the base is
    quantized right before it is sharded (``sharding_next``, see
    :meth:`FourBitPrecision.quantize_before_sharding`), or was already (``pending``, the
    layers still to quantize, is empty). Other sharding strategies do not.
    """
    if isinstance(strategy, ModelParallelStrategy) and pending is not None:
        sharded = [name for name, layer in pending if hasattr(layer.weight, "device_mesh")]
        if sharded:
            raise RuntimeError(
                f"FourBitPrecision: {sharded[0]} (and {len(sharded) - 1} more layer(s)) was sharded before it "
                "was quantized. Quantize first, then shard: call lightning_peft.strategies.shard_backbone("
                "self, self.device_mesh) in configure_model (lightning_peft's own modules do), or "
                "trainer.precision_plugin.quantize_before_sharding(self) before fully_shard."
            )
        if sharding_next or not pending:
            return
    for cls, reason in UNSUPPORTED_STRATEGIES:
        if isinstance(strategy, cls):
            raise RuntimeError(
                f"FourBitPrecision does not support {type(strategy).__name__}: {reason}. Use a single device "
                "or strategy='ddp' (each rank holds the whole 4-bit base, which is 1/4 to 1/8 the size)."
            )


def upcast_trainable(module: nn.Module) -> list[str]:
    """Cast trainable floating parameters that are not fp32 to fp32 (the optimizer's copy); returns their names."""
    names = []
    seen = set()
    named = list(trainable_named_parameters(module))
    named += [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for name, param in named:
        if id(param) in seen or not param.is_floating_point() or param.dtype == torch.float32:
            continue
        seen.add(id(param))
        param.data = param.data.float()
        names.append(name)
    return names
