"""The cache itself: content-addressed files, fills, the index and the janitor. It knows nothing of
registries or hubs; sources reach it through one door, `Store` (store.py)."""
