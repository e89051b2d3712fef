"""Everything that runs the model: prefill, scoring presses, selection, generation."""
