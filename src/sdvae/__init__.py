"""sdvae: train, evaluate and ship Stable-Diffusion-style KL autoencoders."""

__version__ = "0.1.0"

# the file formats register themselves with the models (AutoencoderKL.from_pretrained)
import sdvae.formats  # noqa: F401
