"""Runs an exported kdfast model in a process that cannot import kdfast (an import of it raises),
as a deployment target would: `python no_kdfast_runner.py FORMAT MODEL INPUT.npy EXPECTED.npy`.

FORMAT: onnx (ONNX Runtime and numpy only, torch is not imported either), plain (torch.load of the
pickled torch.fx.GraphModule) or exported (torch.export.load of a .pt2). Prints one JSON line:
{"max_abs_err": ..., "max_abs_ref": ..., "shape": [...], "modules": [imported top-level modules of interest]}.
Used by tests/compression/test_export.py and tests/cli/test_cli_export.py.
"""
import json
import sys


class _NoKdfast:
    """A meta-path finder that refuses kdfast, wherever it is installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "kdfast" or name.startswith("kdfast."):
            raise ImportError(f"this process must not import kdfast (tried {name})")
        return None


sys.meta_path.insert(0, _NoKdfast())

import numpy as np  # noqa: E402


def main(fmt: str, model_path: str, input_path: str, expected_path: str) -> None:
    x = np.load(input_path)
    expected = np.load(expected_path)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x})[0]
    else:
        import torch

        if fmt == "plain":
            model = torch.load(model_path, weights_only=False)
        elif fmt == "exported":
            model = torch.export.load(model_path).module()
        else:
            raise SystemExit(f"unknown format {fmt!r}")
        with torch.no_grad():
            out = model(torch.from_numpy(x)).numpy()
    print(json.dumps({
        "max_abs_err": float(np.abs(out - expected).max()),
        "max_abs_ref": float(np.abs(expected).max()),
        "shape": list(out.shape),
        "modules": sorted(m for m in ("kdfast", "torch", "onnxruntime") if m in sys.modules),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:5])
