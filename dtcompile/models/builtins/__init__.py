"""The tiny built-in models, one module per family (``BUILTINS``: name -> ``BuiltinModel``), beside the family
adapters rather than inside them. ``dtcompile.models.builtin.builtins()`` collects them by family module name.
"""
