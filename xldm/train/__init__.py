"""Training SDXL-family models: aspect-ratio buckets and their crop bookkeeping (`buckets`), image-caption
data from folders and WebDataset shards (`data`), a generated shapes dataset for tests (`shapes_dataset`), and
the training loop."""
