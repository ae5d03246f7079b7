"""Where volumes live and how they are read: URLs and object stores, formats, retries, the chunk
cache."""
