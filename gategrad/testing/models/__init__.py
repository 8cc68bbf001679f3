"""Tiny reference models for the gategrad test kit.

Importing this package imports NumPy only. It exports the configs and the NumPy (float64)
parameter initialisers. The forward passes live in one module per framework, imported explicitly:

- ``gategrad.testing.models.numpy_models`` (the float64 reference)
- ``gategrad.testing.models.torch_models``
- ``gategrad.testing.models.jax_models``
- ``gategrad.testing.models.mlx_models``

Each provides ``params_from_numpy(np_params, dtype)``, ``to_numpy(tree)``,
``softmax_logits(params, contexts) -> (N, V)`` and
``transformer_logits(params, tokens, cfg, attention_mask=None) -> (B, T, V)``.

Example::

    from gategrad.testing.models import TransformerConfig, init_transformer_params
    from gategrad.testing.models import torch_models as tm

    cfg = TransformerConfig()
    params = tm.params_from_numpy(init_transformer_params(cfg, seed=0), "float32")
    logits = tm.transformer_logits(params, tokens, cfg)
"""

from gategrad.testing.models._params import (
    DTypeName,
    SoftmaxConfig,
    TransformerConfig,
    init_softmax_params,
    init_transformer_params,
    make_shared_contexts,
    transformer_param_shapes,
)

__all__ = [
    "DTypeName",
    "SoftmaxConfig",
    "TransformerConfig",
    "init_softmax_params",
    "init_transformer_params",
    "make_shared_contexts",
    "transformer_param_shapes",
]
