"""From a box to a mask: windowing and the model's input, the predictor, propagation and its variants, several structures, corrections, review, and the record (provenance)."""
