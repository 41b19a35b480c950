"""Built-in offline demos: text classification (``text``), generation, text-to-image (``image``)."""
