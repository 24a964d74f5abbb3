"""The model: LoraSpec, capture (torch.export → GraphModule), LoraModel and transform, named
adapters, streaming from_pretrained, and the torch.compile backend."""
