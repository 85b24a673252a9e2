"""Dense models re-laid as Mixture-of-Experts models, built from real weights."""
