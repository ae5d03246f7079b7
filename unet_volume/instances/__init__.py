"""Instance labels of whole volumes: connected components, the seeded watershed, the object
table."""
