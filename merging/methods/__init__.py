"""One module per merge method or family; each registers its methods (merging.method.register).

The registry (merging.METHODS) imports every module here, so a new method is one new file.
"""
