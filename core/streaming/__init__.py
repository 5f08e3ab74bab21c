"""Layer streaming: a model opened without materialising it (`model`), what every decoder layer
is called with (`capture`), hidden states carried from layer to layer (`hidden`), the layer pass
(`layer_pass`) with per-layer checkpoints (`checkpoints`), the LM head in vocabulary chunks
(`head`), streamed teacher-forced evaluation (`evaluate`) and generation when the model fits
(`generate`)."""
