"""Private implementation of stablejax. Import from the public modules instead."""
