"""The size budget: measure what each tensor costs at each type (profile), then choose types for a size."""
