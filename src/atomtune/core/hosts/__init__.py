"""Glue to host libraries (diffusers, transformers); the method itself lives one level up."""
