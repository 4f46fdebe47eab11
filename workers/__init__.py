"""Worker processes: loaders (SSD -> ring) and the GPU process (ring -> GPU -> Llama forward)."""
