"""Training SDXL-family models: image-caption data from folders and WebDataset shards, batched by aspect-ratio
bucket (`data`; the buckets and their crop bookkeeping: `xldm.buckets`), and the training loop."""
