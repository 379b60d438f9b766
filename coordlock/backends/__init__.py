"""Built-in backends, one module each. Each module imports its driver only when loaded."""
