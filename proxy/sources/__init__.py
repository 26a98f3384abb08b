"""One package per kind of upstream; each turns its protocol into calls on the cache."""
