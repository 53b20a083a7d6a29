"""Neural network models: the Oobleck VAE autoencoder and the diffusion transformer."""
