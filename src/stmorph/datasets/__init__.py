"""Built-in data: synthetic tissue with a full-resolution H&E-like image."""
