"""Data in, latents out: image sources (`sources`), image handling (`images`), the built-in shapes
data set (`shapes`) and the latent cache (`cache`). Import the sub-module you need."""
