"""Face and diffusion models, loading, the model store, runtime, the simulated GPU."""
