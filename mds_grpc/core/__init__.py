"""The protocol-neutral core: models, uploads and inference, free of any wire format."""
