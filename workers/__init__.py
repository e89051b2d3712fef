"""Decode workers that run outside Ray and fetch compressed caches from the prefix store (issue #4)."""
