"""The reference engine: a real post-copy migration between two processes."""
