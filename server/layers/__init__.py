"""Building blocks of the models: LoRA-aware linear layers, rotary embeddings, norms, paged attention."""
