"""Built-in datasets (synthetic shapes) and their registration with Detectron2."""
