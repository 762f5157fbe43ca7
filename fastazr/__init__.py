"""fastazr: a performance-first Absolute Zero self-play trainer for one GPU node.

This package's top level imports nothing heavy: the sandbox's zygote processes import
fastazr.sandbox and must stay small (no torch, no numpy).
"""

__version__ = "0.1.0"
