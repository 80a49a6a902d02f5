"""Training-data tools: procedural street scenes, the subnet's challenge augmentations, dataset writer."""
