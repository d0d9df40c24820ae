"""Object stores: the interface, S3, GCS, residency, production posture."""
