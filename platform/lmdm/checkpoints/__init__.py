"""Importing foreign checkpoints (Stable Audio Open) into lmdm models, with strict key and shape checks."""
