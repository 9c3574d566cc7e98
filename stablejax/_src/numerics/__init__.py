"""stablejax's numerics pillar (private)."""
