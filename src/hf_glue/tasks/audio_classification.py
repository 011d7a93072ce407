"""Audio classification (wav2vec2 / HuBERT family) with the experts' feature extractor."""
