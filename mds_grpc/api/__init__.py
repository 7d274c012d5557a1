"""The mds.v1 gRPC front door: converts wire messages and delegates to the core."""
