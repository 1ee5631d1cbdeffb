"""The release check: build, inspect and install the distribution as a new user would."""
