"""The head ops behind the backends: per-token log-probs and statistics of a linear head on an
`align_losses.problem.HeadProblem`, without ever holding the ``[M, V]`` logits.

- `tiled_head`: pure PyTorch, any device (the ``"torch"`` backend); its per-tile math is in `tiles`, pure
  functions it runs eagerly or through `torch.compile`, and its weight gradient's label terms and rows written
  in place in `weight_rows`.
- `triton_head`: the ``"triton"`` backend's forward and dense backward (host side); its kernels are
  in `triton_kernels`, and its opt-in filtering backward in `triton_filter` (with `slots`, the layout
  that backward walks).
- `triton_shared`: the host-side pieces both Triton backwards use.
- `stats`: the per-token statistics and the outputs computed from them, for both ops.
- `library`: both heads as registered PyTorch operators (``align_losses::head_forward`` / ``head_backward``),
  which `torch.compile` traces as one node each and a CUDA graph can capture; they call the heads'
  ``forward_outputs`` / ``backward_grads``, the code their autograd Functions call.
- `gemm`: the fp32-output GEMMs both heads' tiles use.
- `labels`: the labelled positions and the label range check, shared by the core and `library`.

Imports run one way: ``triton_head -> triton_filter -> triton_shared -> triton_kernels``,
``tiled_head -> tiles``, ``tiled_head -> weight_rows``, both heads, `tiles` and `weight_rows` -> `stats`, both heads
and `weight_rows` -> `gemm`, and every op ->
`align_losses.problem`; no op imports `align_losses.backends`. Importing
this package imports none of them (Triton loads with the ``triton_*`` modules only).
"""
