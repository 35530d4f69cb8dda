"""What every family's models share: the user's own class (`model.target`) and safetensors weights."""
