"""Benchmarks of the bridge (scripts that print figures; not tests). See docs/tunnels.md."""
