"""Lightning strategies for a frozen-backbone run: FSDP2 sharding, strategy settings, sharded delta checkpoints.

* :func:`shard_backbone` applies PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) to
  every transformer block and then to the backbone, after a method has been applied. FSDP2
  shards each parameter on its own, so frozen base weights and trainable method weights can
  share one block: frozen ones are only all-gathered, trainable ones also get their
  gradients reduce-scattered. Our LightningModules call it from ``configure_model`` when
  Lightning's ``ModelParallelStrategy`` provides a device mesh. With the 4-bit plugin the
  base is quantized first, so QLoRA shards its 4-bit codes.
* :func:`prepare_strategy` (run by every method callback) adjusts the strategy:
  delta-aware checkpoint saving and loading for ``ModelParallelStrategy``
  (:func:`install_delta_checkpointing`), ``use_orig_params`` and a per-block wrap policy for
  ``FSDPStrategy`` (:func:`configure_fsdp`), frozen weights left out of DeepSpeed
  checkpoints (:func:`configure_deepspeed`). :func:`fsdp_strategy` and
  :func:`deepspeed_strategy` build those CUDA-only strategies with these settings.
* :func:`consolidate_checkpoint` turns a sharded checkpoint folder into one file that loads
  in a single process.

Reading a few values of a shard and copying into shards is plain torch
(:mod:`lightning_peft.core.sharded`); restoring deltas goes through the one restore path.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from .checkpointing import META_KEY, is_delta_checkpoint, on_load_checkpoint
from .core.sharded import full_tensor
from .core.targeting import find_backbone, find_block_list
from .methods.base import applied_methods, sync_requires_grad
from .persistence.state import delta_state_dict
from .plugins import FourBitPrecision

LIGHTNING_METADATA = "meta.pt"
"""The file of a sharded Lightning checkpoint folder that holds everything but the tensors."""
DATA_PARALLEL = "data_parallel"
"""Name of the data-parallel dimension in Lightning's ``ModelParallelStrategy`` device mesh."""


# --------------------------------------------------------------------------- FSDP2
def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) was applied to ``module`` or any of its submodules."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The one-dimensional mesh to shard over.

    A 1-D mesh is used as is. A 2-D mesh from ``ModelParallelStrategy`` (dimensions
    ``data_parallel`` x ``tensor_parallel``) must have a tensor-parallel size of 1: our
    modules apply data parallelism (FSDP2) only.

    Raises:
        ValueError: If the mesh has other dimensions of size > 1.
    """
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if DATA_PARALLEL not in names:
        raise ValueError(
            f"cannot shard over a {mesh.ndim}-D device mesh without a {DATA_PARALLEL!r} dimension "
            f"(dimensions: {names}); pass a 1-D mesh"
        )
    others = {n: mesh.size(i) for i, n in enumerate(names) if n != DATA_PARALLEL and mesh.size(i) > 1}
    if others:
        raise ValueError(
            f"the backbone is sharded with FSDP2 over the {DATA_PARALLEL!r} dimension only, but the device "
            f"mesh also has {others}. Use ModelParallelStrategy(data_parallel_size=<world size>, "
            "tensor_parallel_size=1), or override configure_model to add tensor parallelism yourself."
        )
    return mesh[DATA_PARALLEL]


def shard_backbone(
    module: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: Any | None = None,
) -> nn.Module:
    """Shard ``module`` with FSDP2: each transformer block, then the backbone, then the rest.

    Call it after the fine-tuning method was applied (so its new modules are sharded with
    the blocks they live in). Frozen and trainable parameters may share a block: FSDP2
    shards every parameter along dim 0 and keeps ``requires_grad``; the trainability
    declarations live on modules and survive the parameter swap. If the run uses
    :class:`~lightning_peft.plugins.FourBitPrecision` (QLoRA), the base is quantized first
    and its 4-bit codes are sharded like any other tensor. Calling it again on a sharded
    module does nothing.

    Args:
        module: A LightningModule or any ``nn.Module`` holding a Hugging Face backbone.
        mesh: The device mesh; a 2-D ``ModelParallelStrategy`` mesh is reduced to its
            data-parallel dimension (see :func:`data_parallel_mesh`).
        reshard_after_forward: Free the gathered weights after each block's forward
            (ZeRO-3 behaviour) rather than keeping them until backward (ZeRO-2).
        mp_policy: An optional ``torch.distributed.fsdp.MixedPrecisionPolicy``.

    Returns:
        ``module``, sharded in place.

    Raises:
        ValueError: If the model has no list of repeated blocks, or the mesh is not
            data-parallel only.
    """
    if is_sharded(module):
        return module
    mesh = data_parallel_mesh(mesh)
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    _quantize_first(module)
    backbone = find_backbone(module)
    _, blocks = find_block_list(backbone)
    try:
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(backbone, **kwargs)
        # Parameters a method placed outside the backbone (or a user's extra modules) must be
        # sharded too: an unsharded parameter would never have its gradient reduced.
        if backbone is not module:
            for child in _containers_of_plain_parameters(module, backbone):
                fully_shard(child, **kwargs)
    except RuntimeError as err:
        if "floating point dtype can require gradients" not in str(err):
            raise
        raise RuntimeError(
            f"this torch ({torch.__version__}) cannot shard the 4-bit base with FSDP2: its fully_shard "
            "marks every shard as requiring gradients, which integer 4-bit codes cannot. QLoRA under "
            "ModelParallelStrategy needs a newer torch (2.13 works); with this one, train QLoRA under "
            "DDP (strategy='ddp')."
        ) from err
    sync_requires_grad(module)
    return module


def _quantize_first(module: nn.Module) -> None:
    """Quantize the frozen base now if the run uses ``FourBitPrecision`` (QLoRA).

    FSDP2 turns each parameter into a ``DTensor`` shard; the 4-bit codes shard like any
    tensor, while their scales stay on the layer (bitsandbytes keeps a copy there). So the
    base is quantized first, on the run's device, and sharded after; the plugin's own
    ``convert_module`` later finds nothing left to quantize.
    """
    trainer = getattr(module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None)
    if isinstance(plugin, FourBitPrecision):
        plugin.quantize_before_sharding(module)


def _containers_of_plain_parameters(module: nn.Module, backbone: nn.Module) -> list[nn.Module]:
    """Top-level children of ``module`` (other than the backbone) that own parameters."""
    out = []
    for child in module.children():
        if child is backbone or any(m is backbone for m in child.modules()):
            continue
        if next(child.parameters(), None) is not None:
            out.append(child)
    direct = [n for n, _ in module.named_parameters(recurse=False)]
    if direct:
        raise ValueError(
            f"{type(module).__name__} holds parameter(s) {direct} directly; FSDP2 can only shard "
            "parameters inside submodules. Move them into a submodule."
        )
    return out


# --------------------------------------------------------------------------- Lightning strategies
_PREPARED = "_lp_strategy_prepared"


def prepare_strategy(trainer: Any, pl_module: nn.Module) -> None:
    """Check and adjust the trainer's strategy for a frozen-backbone run (idempotent).

    * ``ModelParallelStrategy`` (FSDP2): checkpoints hold only the delta tensors, sharded
      (``torch.distributed.checkpoint`` folder) or gathered (one file), and resume from them
      (see :func:`install_delta_checkpointing`).
    * ``FSDPStrategy`` (FSDP1, CUDA): see :func:`configure_fsdp` (trains; no delta checkpoints).
    * ``DeepSpeedStrategy`` (CUDA): see :func:`configure_deepspeed`.
    * DDP and single-device strategies need nothing: methods are applied before wrapping,
      and every trainable parameter of every method takes part in each step, so the
      default ``find_unused_parameters=False`` holds.
    """
    strategy = trainer.strategy
    if getattr(strategy, _PREPARED, False):
        return
    if isinstance(strategy, ModelParallelStrategy):
        install_delta_checkpointing(strategy)
    elif isinstance(strategy, FSDPStrategy):
        configure_fsdp(strategy, pl_module, trainer)
    elif isinstance(strategy, DeepSpeedStrategy):
        configure_deepspeed(strategy, pl_module)
    setattr(strategy, _PREPARED, True)


def install_delta_checkpointing(strategy: Any) -> None:
    """Make a ``ModelParallelStrategy`` save and load only the delta tensors.

    Lightning's strategy collects and loads the whole model's state dict; a delta
    checkpoint lacks the frozen tensors, so it could not be loaded back. With this:

    * saving collects only the delta tensors (sharded ``DTensor`` pieces for the default
      ``save_distributed_checkpoint=True``, gathered full tensors otherwise): the frozen
      model is never gathered or copied;
    * loading a delta checkpoint verifies it first (methods, base fingerprint, exact key set
      and shapes, by :func:`lightning_peft.checkpointing.on_load_checkpoint`) and then loads
      the delta tensors and the optimizer state shard by shard. Other checkpoints load as
      Lightning loads them.
    """
    if getattr(strategy, "_lp_delta_checkpointing", False):
        return
    original_state_dict = strategy.lightning_module_state_dict
    original_load = strategy.load_checkpoint
    strategy.lightning_module_state_dict = functools.partial(_state_dict, strategy, original_state_dict)
    strategy.load_checkpoint = functools.partial(_load_checkpoint, strategy, original_load)
    strategy._lp_delta_checkpointing = True


def _state_dict(strategy: Any, original: Any) -> dict[str, Any]:
    module = strategy.lightning_module
    state = delta_state_dict(module) if applied_methods(module) else {}
    if not state:
        return original()
    if not getattr(strategy, "_save_distributed_checkpoint", True):
        state = {name: full_tensor(t).cpu() for name, t in state.items()}  # a collective
    return state


def _load_checkpoint(
    strategy: Any, original: Any, checkpoint_path: Any, weights_only: bool | None = None
) -> Any:
    path = Path(strategy.broadcast(checkpoint_path))
    module = strategy.lightning_module
    if not path.is_dir():  # one file, written with save_distributed_checkpoint=False
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
        if not is_delta_checkpoint(checkpoint):
            return original(path, weights_only)
        on_load_checkpoint(module, checkpoint)  # verifies before anything changes
        strict = module._strict_loading
        module.strict_loading = False  # the file holds exactly the delta keys (just verified)
        try:
            rest = original(path, weights_only)
        finally:
            module._strict_loading = strict
        rest.update({k: v for k, v in checkpoint.items() if k not in rest})
        return rest
    metadata = torch.load(path / LIGHTNING_METADATA, weights_only=weights_only)
    if not is_delta_checkpoint(metadata):
        return original(path, weights_only)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    live = delta_state_dict(module)
    # Load what the checkpoint holds of our keys; a missing or extra key fails the check below.
    loaded = {name: torch.empty_like(t) for name, t in live.items() if f"state_dict.{name}" in stored}
    dcp.load({"state_dict": loaded}, checkpoint_id=path)
    saved_names = {k.split(".", 1)[1] for k in stored if k.startswith("state_dict.")}
    extra = {name: torch.empty(0) for name in saved_names - loaded.keys()}  # reported by the check
    checkpoint = {**metadata, "state_dict": {**loaded, **extra}}
    on_load_checkpoint(module, checkpoint)  # the one restore path: adapters, fingerprint, key set, copy
    for idx, optimizer in enumerate(strategy.optimizers):
        key = f"optimizer_{idx}"
        state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(
            module, optimizer, optim_state_dict=state[key], options=StateDictOptions(cpu_offload=True)
        )
    return checkpoint


def consolidate_checkpoint(folder: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Turn a sharded ``ModelParallelStrategy`` checkpoint folder into one Lightning checkpoint.

    The result loads without any process group: ``CausalLM.load_from_checkpoint(output)``,
    ``Trainer(devices=1).fit(ckpt_path=output)``. For a delta checkpoint it holds only the
    delta tensors and their optimizer state, so it is as small as the folder.

    Args:
        folder: The checkpoint folder (``torch.distributed.checkpoint`` files plus Lightning's
            ``meta.pt``). Load only folders you trust: ``meta.pt`` is a pickle.
        output: Where to ``torch.save`` the result (optional).

    Returns:
        The checkpoint dict, with optimizer states keyed by parameter index as a
        single-process optimizer expects.
    """
    folder = Path(folder)
    if not (folder / LIGHTNING_METADATA).is_file():
        raise FileNotFoundError(
            f"{folder} is not a sharded Lightning checkpoint (no {LIGHTNING_METADATA} inside)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=True)
    checkpoint = torch.load(folder / LIGHTNING_METADATA, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = state.pop("state_dict")
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_index_keyed(state.pop(k)) for k in optimizers]
    if output is not None:
        torch.save(checkpoint, output)
    return checkpoint


def _index_keyed(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """Re-key an optimizer state dict from parameter names to indices (``Optimizer.state_dict`` format)."""
    index: dict[str, int] = {}
    groups = []
    for group in optimizer_state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    states = {index[name]: value for name, value in optimizer_state["state"].items()}
    return {"state": states, "param_groups": groups}


class BlockWrapPolicy:
    """FSDP1 auto-wrap policy: one FSDP unit per transformer block of ``model``.

    The block class is found (:func:`lightning_peft.targeting.find_block_list`) when FSDP
    wraps, so it also works for models built in ``configure_model``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._types: tuple[type[nn.Module], ...] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        """FSDP asks with ``recurse=True`` whether to descend, then whether to wrap ``module``."""
        if recurse:
            return True
        if self._types is None:
            _, blocks = find_block_list(find_backbone(self.model))
            self._types = (type(blocks[0]),)
        return isinstance(module, self._types)


FSDP1_CHECKPOINTS = (
    "delta checkpoints are not supported under FSDPStrategy (FSDP1): it gathers the state dict on rank 0 "
    "only and flattens the frozen weights the base fingerprint reads. Train with enable_checkpointing=False, "
    "or use ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1) (FSDP2), whose sharded "
    "delta checkpoints save and resume"
)


def configure_fsdp(strategy: Any, pl_module: nn.Module, trainer: Any = None) -> None:
    """Adjust a Lightning ``FSDPStrategy`` (FSDP1) for frozen and trainable parameters.

    FSDP1 flattens the parameters of each wrapped unit into one tensor; frozen and
    trainable parameters can share a unit only with ``use_orig_params=True``. Without an
    auto-wrap policy the whole model would be one unit (no memory saved), so each
    transformer block becomes one (:class:`BlockWrapPolicy`). A policy the user set is kept.
    Checkpoints are refused up front (see :data:`FSDP1_CHECKPOINTS`).

    Raises:
        ValueError: If ``use_orig_params=False`` was asked for, or ``trainer`` would write
            checkpoints.
    """
    if strategy.kwargs.get("use_orig_params") is False:
        raise ValueError(
            "FSDPStrategy(use_orig_params=False) cannot hold frozen and trainable parameters in one FSDP "
            "unit; remove use_orig_params=False, or use ModelParallelStrategy (FSDP2)"
        )
    if trainer is not None and getattr(trainer, "checkpoint_callbacks", None):
        raise ValueError(FSDP1_CHECKPOINTS)
    strategy.kwargs["use_orig_params"] = True
    strategy.kwargs.setdefault("auto_wrap_policy", BlockWrapPolicy(pl_module))
    strategy.lightning_module_state_dict = _refuse_fsdp1_checkpoint


def _refuse_fsdp1_checkpoint() -> dict[str, Any]:
    raise NotImplementedError(FSDP1_CHECKPOINTS)


def fsdp_strategy(**kwargs: Any) -> Any:
    """A Lightning ``FSDPStrategy`` (CUDA only) set up for parameter-efficient fine-tuning.

    ``use_orig_params=True`` and, unless given, the :class:`BlockWrapPolicy` of the model are
    filled in when the run is set up (see :func:`configure_fsdp`). For delta checkpoints
    use ``ModelParallelStrategy`` (FSDP2) instead.

    Args:
        **kwargs: Anything ``FSDPStrategy`` accepts (``sharding_strategy``,
            ``mixed_precision``, ``cpu_offload``, ``activation_checkpointing_policy``...).
    """
    if kwargs.get("use_orig_params") is False:
        raise ValueError(
            "fsdp_strategy needs use_orig_params=True (frozen and trainable parameters share units)"
        )
    return FSDPStrategy(**kwargs)


def configure_deepspeed(strategy: Any, pl_module: Any) -> None:
    """Adjust a Lightning ``DeepSpeedStrategy`` (CUDA only) for delta checkpoints.

    DeepSpeed writes and reads checkpoints itself. ``exclude_frozen_parameters=True`` makes
    it leave the frozen base out, and the module loads non-strictly since the base is not in
    the checkpoint. DeepSpeed restores the weights before Lightning's hooks run and does not
    report which keys it loaded, so the delta metadata is dropped from what it returns: the
    key-set and fingerprint checks of :mod:`lightning_peft.checkpointing` do not run here.
    """
    strategy.exclude_frozen_parameters = True
    if hasattr(pl_module, "strict_loading"):
        pl_module.strict_loading = False
    if not getattr(strategy, "_lp_delta_checkpointing", False):
        strategy.load_checkpoint = functools.partial(_deepspeed_load, strategy.load_checkpoint)
        strategy._lp_delta_checkpointing = True


def _deepspeed_load(original: Any, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
    client_state = original(checkpoint_path, weights_only)
    if isinstance(client_state, dict):
        client_state.pop(META_KEY, None)  # weights already loaded by DeepSpeed (see configure_deepspeed)
    return client_state


def deepspeed_strategy(stage: int = 2, **kwargs: Any) -> Any:
    """A Lightning ``DeepSpeedStrategy`` (CUDA only) for parameter-efficient fine-tuning.

    ZeRO-2 shards gradients and optimizer states of the trainable parameters (the frozen
    base stays replicated: fine while it fits one GPU); ZeRO-3 also shards the base.

    Args:
        stage: ZeRO stage, 2 or 3.
        **kwargs: Anything ``DeepSpeedStrategy`` accepts (``offload_optimizer``, ...).

    Raises:
        ValueError: For another stage.
    """
    if stage not in (2, 3):
        raise ValueError(f"stage must be 2 or 3 (ZeRO-1 saves nothing over DDP for adapters), got {stage!r}")
    kwargs.setdefault("exclude_frozen_parameters", True)
    return DeepSpeedStrategy(stage=stage, **kwargs)
