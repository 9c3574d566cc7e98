"""stablejax's debug pillar (private)."""
