"""fastazr.kernels: Triton kernels (installed from the repository's kernels/ folder).

Imported as ``fastazr.kernels``, never as a top-level ``kernels`` module: PyPI's ``kernels``
package (an SGLang dependency) owns that name.

- :func:`linear_logprobs`: per-token log-probabilities (and entropy) from hidden states and the
  lm_head weight, without materializing logits (logprobs.py).
- :func:`pg_loss`: the fused PPO-clip policy-gradient loss (policy_loss.py).
- :func:`linear_pg_loss`: both at once, from hidden states, with the gradient made in the
  forward (6*N*H*V FLOP; linear_policy_loss.py).

Each has a plain fp32 torch reference beside it (``*_reference``), used by tests and benchmarks.
"""
from fastazr.kernels.logprobs import linear_logprobs
from fastazr.kernels.linear_policy_loss import linear_pg_loss
from fastazr.kernels.linear_policy_loss_reference import LinearPGLoss, linear_pg_loss_reference
from fastazr.kernels.logprobs_reference import linear_logprobs_reference
from fastazr.kernels.policy_loss import pg_loss
from fastazr.kernels.policy_loss_reference import PGLoss, pg_loss_reference

__all__ = ["linear_logprobs", "linear_logprobs_reference", "pg_loss", "pg_loss_reference", "PGLoss",
           "linear_pg_loss", "linear_pg_loss_reference", "LinearPGLoss"]
