"""Scoring retrieval: the exact ranking, recall metrics and tie rules, ground truth with several correct candidates
and its ranking engine, and the evaluation protocols (the published ones, ECCV Caption and CxC)."""
