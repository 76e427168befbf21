"""A stand-in for apex (Ascend's fork or NVIDIA's) for tests only: apex.amp records how it is called."""
