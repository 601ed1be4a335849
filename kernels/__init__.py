"""Fused kernels. `token_logprobs`: linear -> per-token log-prob (+ entropy) without [N, V] logits (kernels/logprobs.py).

triton is optional: kernels/logprobs_triton.py is imported only when the Triton path runs.
"""
from kernels.logprobs import token_logprobs

__all__ = ["token_logprobs"]
