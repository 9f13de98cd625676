"""Where model weights come from: Hugging Face ids, local folders, the embedded model."""
