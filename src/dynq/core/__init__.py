"""The bottom vocabulary layer: types, sizes, units, importance data, the source protocol, the run context."""
