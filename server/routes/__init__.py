"""HTTP route handlers, one module per API family (TGI, OpenAI, adapter admin, probes)."""
