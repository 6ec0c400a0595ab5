"""Model loading, steering integration and the generation engine."""
