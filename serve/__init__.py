"""Ray Serve application: the HTTP ingress, the job runners, the app graph, the launcher,
live tuning and the CLI."""
