"""What the trainer loads and holds: the teacher (diffusers folder or single-file checkpoint, its
tokenizers and text conditioning), the LoRA student on the teacher's own UNet, the VAE decode, latent LPIPS."""
