"""stablejax's layers pillar (private)."""
