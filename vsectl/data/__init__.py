"""Feature sets, captions, vocabularies, augmentation and batching."""
