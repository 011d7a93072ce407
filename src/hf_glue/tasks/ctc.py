"""Speech recognition with CTC (wav2vec2 / HuBERT family): the experts' processor; WER as the metric."""
