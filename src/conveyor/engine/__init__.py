"""Engine: use cases and background loops. Owns transaction boundaries; reaches storage only
through the ports in engine/ports.py."""
