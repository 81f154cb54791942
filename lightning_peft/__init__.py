"""lightning-peft: parameter-efficient fine-tuning of Hugging Face models as Lightning callbacks."""

from .methods.base import applied_methods, count_parameters, trainable_parameter_names
from .modules import CausalLM, SequenceClassifier
from .version import __version__

__all__ = [
    "CausalLM",
    "SequenceClassifier",
    "__version__",
    "applied_methods",
    "count_parameters",
    "trainable_parameter_names",
]
