"""1D tokenizers: encoder, quantizers, decoder, training, token cache."""
