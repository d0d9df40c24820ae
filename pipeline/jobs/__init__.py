"""A job from intake to its end: intake, orchestration, stages, clips."""
