"""After training: export of (merged) models as torch.export programs and AOTInductor packages."""
