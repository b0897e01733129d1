"""Running a training stage: setup (accelerator, inputs, UNet roles), the one training loop, checkpoints,
metrics, sample grids and the LoRA writer. Both stages run through here."""
