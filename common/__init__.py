"""detrkd.common: everything the distillation methods share (ops, models, data, training)."""
