"""Calibration: run the float model over real text in ONNX Runtime and reduce the inputs of
every weight matmul (Hessians, channel statistics, sampled rows) stage by stage."""
