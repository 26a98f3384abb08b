"""HTTP pieces shared by every source: byte ranges and streaming blob responses."""
