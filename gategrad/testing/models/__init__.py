"""Tiny reference models for the gategrad test kit, written once for every framework.

Importing this package imports NumPy only; a framework is imported when
[`params_from_numpy`][] first names it. The forward passes find their framework from the
parameters' arrays and compute with that backend's operations (``gategrad._backend``), so
NumPy (the float64 reference), PyTorch, JAX and MLX run the same maths:

- ``params_from_numpy(np_params, backend, dtype="float64", device=None)``: a NumPy parameter
  dict (from [`init_softmax_params`][] or [`init_transformer_params`][]) as arrays of
  ``backend`` (``'numpy' | 'torch' | 'jax' | 'mlx'``);
- ``softmax_logits(params, contexts) -> (N, V)``;
- ``transformer_logits(params, tokens, cfg, attention_mask=None) -> (B, T, V)``;
- ``to_numpy(tree)``: any framework's arrays (in dicts, lists, tuples) as NumPy.

The modules ``numpy_models``, ``torch_models``, ``jax_models`` and ``mlx_models`` are the same
functions with the framework bound (``params_from_numpy(np_params, dtype)``).

For example:

```python
from gategrad.testing.models import TransformerConfig, init_transformer_params
from gategrad.testing.models import params_from_numpy, transformer_logits

cfg = TransformerConfig()
params = params_from_numpy(init_transformer_params(cfg, seed=0), "torch", "float32")
logits = transformer_logits(params, tokens, cfg)
```
"""

from gategrad.testing.models._forward import (
    params_from_numpy,
    softmax_logits,
    to_numpy,
    transformer_logits,
)
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
    "params_from_numpy",
    "softmax_logits",
    "to_numpy",
    "transformer_logits",
    "transformer_param_shapes",
]
