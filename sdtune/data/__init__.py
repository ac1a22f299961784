"""Training data: reading folders (``scan``, ``intake``: EXIF, modes, alpha, size caps), captions
(``captions``), aspect-ratio buckets (``buckets``), kohya dataset_config files (``kohya``), the
dataset of views and their encoding (``dataset``) and the latent disk cache (``latent_cache``)."""
