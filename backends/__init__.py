"""Framework adapters, installed as ``gategrad.backends``.

One module per framework: ``numpy`` (the reference), ``torch``, ``jax`` and ``mlx``. Each holds only
what must differ between frameworks: the custom-gradient primitive ``scale_grad`` and a small
array namespace (``ops``) that the backend-neutral math in ``gategrad`` is written against.
Modules are imported lazily by :func:`gategrad.get_backend` on first use.
"""
