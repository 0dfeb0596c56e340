"""absl binaries of hfjax's experiments."""
