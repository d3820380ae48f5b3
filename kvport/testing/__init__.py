"""The test kit shipped with kvport: hand-built KV tensors and descriptors that tests, their subprocess helpers and
users' conformance checks share. Must not be imported by kvport's runtime code."""
