"""Training SDXL-family models: the one loop (`loop`) and its tasks (`diffusion`: latent models and cascade stages;
`vae`; `contrastive`: the text encoders), their settings and presets (`config`), data from folders and WebDataset
shards (`data`, `buckets`), checkpoints, DDP/FSDP (`parallel`) and a generated shapes dataset for tests."""
