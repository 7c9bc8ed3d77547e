"""The chaos suite (issue 20): real processes, injected faults, bounded load on 127.0.0.1."""
