"""Example operations for Squire, installed as the package ``squire_examples``."""
