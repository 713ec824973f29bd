"""Export: the trained lineage as ONNX graphs plus a numpy + onnxruntime pipeline that needs no PyTorch.

`runtime` and `numpy_sampling` import no torch (a downstream team runs them alone); `graphs`,
`onnx_export`, `torch_backend` and `stages` build and check the export with torch.
"""
