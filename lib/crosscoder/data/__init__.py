"""Data: text and chat sources (``text``), the model pair and truncated residual-stream extraction
(``pair``), the sharded activation cache (``cache``), the streaming buffer for runs too big to cache
(``buffer``) and the per-source normalisation factors (``normalise``)."""
