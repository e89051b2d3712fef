"""The cache and its byte format. The store reads the format (``format``, ``ids``) without torch."""
