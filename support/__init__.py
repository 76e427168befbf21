"""The support modules: what the stages at the root (data, model, loss, train, evaluate) and the tools stand on.

Imported, never run; docs/layout.md holds the layer map (test/test_layers.py enforces it)."""
