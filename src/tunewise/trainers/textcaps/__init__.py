"""The textcaps trainer: GroupDRO over heterogeneous feature spaces with Gaussian latent anchors (seed 001)."""
