"""stablejax's demo pillar (private)."""
