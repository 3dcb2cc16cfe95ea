"""One folder per framework, same files in each: batchnorm.py (the math),
lenet.py (BN-LeNet from a ModelSpec), backend.py (common.interface.Backend).

Keep this __init__.py: without it pytest may put frameworks/ on sys.path and
`import torch` would then load frameworks/torch. Import a backend through
common.registry.load_backend_module, never by running a file in here.
"""
