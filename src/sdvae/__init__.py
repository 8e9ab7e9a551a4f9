"""sdvae: train, evaluate and ship Stable-Diffusion-style KL autoencoders."""

__version__ = "0.1.0"
