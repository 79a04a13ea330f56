"""The pooling experiments: grid search, the pattern-generation study, the planted benchmark and their figures."""
