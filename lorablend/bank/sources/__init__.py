"""Where bank entries come from besides training: Lots-of-LoRAs checkpoints and BIG-bench's NI tasks."""
