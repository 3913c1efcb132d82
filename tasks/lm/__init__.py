"""``task: lm``: a LLaMA language model on token data.

``config`` (the ``model``/``data`` sections, ``LMConfig``), ``data`` (corpora,
tokenizers, token batches), ``task`` (``build_lm_task``, the layer-wise adapter).
"""
