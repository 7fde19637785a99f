"""Samplers other than the paper's absorbing sampler, each a bench.samplers.Sampler; they are
registered in bench/samplers/registry.py.

- autoregressive: raster-order causal prior with a key/value cache (the Taming Transformers manner)
- autoregressive-recompute: the same weights, the whole prefix recomputed for every token (the
  official Unleashing Transformers baseline's execution)
- maskgit: confidence-ordered parallel decoding (Chang et al., 2022) with the absorbing denoiser
"""
