"""Records, errors, config, retry: the ground every layer stands on."""
