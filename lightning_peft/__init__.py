"""lightning-peft: parameter-efficient fine-tuning of Hugging Face models as Lightning callbacks."""

from .adapters import (
    adapter_names,
    adapter_per_row,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    set_adapter,
    set_trainable,
)
from .data import InstructionData, TextClassificationData
from .merging import merge, merged_state_dict, unmerge
from .methods.base import applied_methods, count_parameters, trainable_parameter_names
from .modules import CausalLM, SequenceClassifier
from .multitask import MultiTaskClassifier, MultiTaskData
from .persistence import export_merged, export_peft, import_peft, load_delta, save_delta
from .version import __version__

__all__ = [
    "CausalLM",
    "InstructionData",
    "MultiTaskClassifier",
    "MultiTaskData",
    "SequenceClassifier",
    "TextClassificationData",
    "__version__",
    "adapter_names",
    "adapter_per_row",
    "add_weighted_adapter",
    "applied_methods",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "export_merged",
    "export_peft",
    "import_peft",
    "load_delta",
    "merge",
    "merged_state_dict",
    "save_delta",
    "set_adapter",
    "set_trainable",
    "trainable_parameter_names",
    "unmerge",
]
