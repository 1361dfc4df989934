"""Graph passes of QuantX-ONNX (installed as ``quantx_onnx.passes``).

Each rewrite rule lives in a module of its own as three functions, after onnxscript's rewriter:
``pattern`` (does this node match, and what does it hold), ``check`` (may it be rewritten, or
why not) and ``replace`` (the QuantX node that takes its place). :mod:`.quantize_linear`
drives the rules over a graph.
"""

from .quantize_linear import LinearPassReport, quantize_linear_nodes
from .rule import LinearMatch, Rule, WeightKey

__all__ = ["LinearMatch", "LinearPassReport", "Rule", "WeightKey", "quantize_linear_nodes"]
