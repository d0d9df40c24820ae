"""Ray Serve application: the HTTP ingress, the batching scheduler, and the launcher."""
