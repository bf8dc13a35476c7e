"""FAiD: feature augmentation in decoding (paper §3.3). `blender` holds the math of one blender, `augment` the
chained blenders inside the backbone, `train` the retrieval precomputation, fine-tuning and loading."""
