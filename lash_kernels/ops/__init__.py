"""One op per module (or package): Triton kernels, launchers, the ``torch.library`` op, the public
function and its pure-torch reference. The public names are exported by :mod:`lash_kernels`."""
