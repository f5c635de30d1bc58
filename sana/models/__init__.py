"""Model families: the Linear DiT (dit.py), the DC-AE autoencoder (dcae.py) and the text encoder."""
