"""Training SDXL-family models: the one loop (`loop`) and its tasks (`diffusion`: latent models and cascade stages;
`vae`; `contrastive`: the text encoders), their settings and presets (`config`), data from folders and WebDataset
shards (`sources`, `data`; aspect-ratio buckets: `xldm.buckets`), the latent cache, checkpoints, DDP/FSDP."""
