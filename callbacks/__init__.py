"""Lightning callbacks that apply a fine-tuning method when a run starts."""

from .base import MethodCallback
from .full import FullFinetuning
from .partial import PartialFinetuning

__all__ = ["FullFinetuning", "MethodCallback", "PartialFinetuning"]
