"""Consumer node daemon: serves transformer blocks over gRPC and drives generation for tasks."""
