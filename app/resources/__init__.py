"""HTTP resources, one module per route family."""
