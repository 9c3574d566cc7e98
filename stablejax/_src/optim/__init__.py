"""stablejax's optim pillar (private)."""
