"""bench: one protocol for absorbing-diffusion and autoregressive token priors (see README.md)."""
