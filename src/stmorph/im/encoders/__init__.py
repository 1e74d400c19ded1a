"""Image encoders behind one registry."""
