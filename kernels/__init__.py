"""fastazr.kernels: Triton kernels (installed from the repository's kernels/ folder).

Imported as ``fastazr.kernels``, never as a top-level ``kernels`` module: PyPI's ``kernels``
package (an SGLang dependency) owns that name.
"""
