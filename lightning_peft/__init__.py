"""lightning-peft: parameter-efficient fine-tuning of Hugging Face models as Lightning callbacks."""

from .data import InstructionData, TextClassificationData
from .merging import merge, merged_state_dict, unmerge
from .methods.base import applied_methods, count_parameters, trainable_parameter_names
from .modules import CausalLM, SequenceClassifier
from .persistence import export_merged, export_peft, import_peft, load_delta, save_delta
from .version import __version__

__all__ = [
    "CausalLM",
    "InstructionData",
    "SequenceClassifier",
    "TextClassificationData",
    "__version__",
    "applied_methods",
    "count_parameters",
    "export_merged",
    "export_peft",
    "import_peft",
    "load_delta",
    "merge",
    "merged_state_dict",
    "save_delta",
    "trainable_parameter_names",
    "unmerge",
]
