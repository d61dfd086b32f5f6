"""Canonical op names: one name per operation, whichever spelling torch.export recorded."""

from __future__ import annotations

import operator

# aten overload packets and Python callables that share a canonical name. Names not listed here keep
# their aten packet name with a trailing in-place underscore removed (``relu_`` -> ``relu``).
_ALIASES: dict[str, str] = {
    "iadd": "add",
    "add": "add",
    "sub": "sub",
    "rsub": "sub",
    "mul": "mul",
    "div": "div",
    "truediv": "div",
    "matmul": "matmul",
    "mm": "matmul",
    "bmm": "matmul",
    "addmm": "linear",
    "linear": "linear",
    "cat": "cat",
    "concat": "cat",
    "concatenate": "cat",
    "_softmax": "softmax",
    "_safe_softmax": "softmax",
    "softmax": "softmax",
    "_log_softmax": "log_softmax",
    "scaled_dot_product_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu": "scaled_dot_product_attention",
    "_scaled_dot_product_efficient_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention": "scaled_dot_product_attention",
    "native_layer_norm": "layer_norm",
    "layer_norm": "layer_norm",
    "_unsafe_view": "view",
    "view": "view",
    "_reshape_alias": "reshape",
    "t": "transpose",
    "transpose": "transpose",
    "split_with_sizes": "split",
    "unsafe_split": "split",
    "native_dropout": "dropout",
    "max_pool2d_with_indices": "max_pool2d",
    "max_pool3d_with_indices": "max_pool3d",
    "_to_copy": "to",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "native_batch_norm": "batch_norm",
    "getitem": "getitem",
}

_PYTHON_OPERATORS = {
    operator.getitem: "getitem",
    operator.add: "add",
    operator.iadd: "add",
    operator.mul: "mul",
    operator.sub: "sub",
    operator.truediv: "div",
    operator.matmul: "matmul",
}

# Ops that torch.export inserts for its own checks; they compute nothing the eager model runs.
IGNORED_OPS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_size"})


def canonical_op_name(target: object) -> str:
    """Return the canonical name of an FX node target (`torch.ops.aten.addmm.default` -> ``linear``)."""
    if target in _PYTHON_OPERATORS:
        return _PYTHON_OPERATORS[target]
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        raw = getattr(packet, "__name__", str(packet)).split(".")[-1]
    else:
        raw = getattr(target, "__name__", str(target)).split(".")[-1]
    if raw in _ALIASES:
        return _ALIASES[raw]
    stripped = raw.rstrip("_") if not raw.startswith("_") else raw
    return _ALIASES.get(stripped, stripped)
