"""How ranks are started: on this machine (local), in this process (direct), or on SLURM."""
