"""Models: GPO and other poolers, image and text encoders, the joint VSE model."""
