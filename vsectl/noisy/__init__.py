"""The noisy-correspondence protocol: noisy training pairs (ratio and seed, or a published index), their record in
the run and its check, and the per-pair training losses with their figure."""
