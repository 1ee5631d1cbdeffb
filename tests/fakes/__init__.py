"""Real HTTP servers standing in for what cannot run on these machines (the Kubernetes API)."""
