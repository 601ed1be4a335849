"""pip install -e .            (runtime: torch, safetensors, sentencepiece, numpy, tqdm, pyyaml)
pip install -e ".[dev,gguf,triton,plot]"  (tests, as .ci/run: pytest + transformers as the parity reference; gguf + protobuf; triton; matplotlib)
pip install -e ".[plot]"      (python -m twice.plot: matplotlib; [tensorboard] / [wandb]: the optional metric sinks)

torch is a *range*: the GPU image ships torch 2.11, the CPU install pins 2.13.0 itself (see .ci/run)."""
from setuptools import setup

setup(
    name="twice",
    version="0.1.0",
    description="TWiCE-Rec from scratch: rationale-aware LLM recommender with collaborative-guided GRPO",
    packages=["twice", "twice.data", "kernels"],
    py_modules=[],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "numpy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest", "transformers>=4.50"],
        "gguf": ["gguf>=0.10", "protobuf"],
        "triton": ["triton"],
        "plot": ["matplotlib"],             # python -m twice.plot RUN_DIR (learning curves as PNGs)
        "tensorboard": ["tensorboard"],     # log.tensorboard: true (twice/logsink.py)
        "wandb": ["wandb"],                 # log.wandb: {project: ...}
    },
)
