"""The latent trainer: multi-task property model with an autoencoder head (seed 003)."""
